"""Test support: the real control plane (cluster), the node agent, assets, bounded polling."""
