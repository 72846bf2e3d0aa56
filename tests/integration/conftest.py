"""Integration tests: the operator's behaviour on a real Kubernetes v1.20.2 control plane.

The fixtures live in tests/support/fixtures.py and are registered for the whole suite by
tests/conftest.py, so that e2e tests share the same session cluster:

  cluster     tests.support.cluster.Cluster (etcd, kube-apiserver, kube-controller-manager,
              kube-scheduler, node agent with nodeagent.DEFAULT_NODES), started once per session
  kube        kubernetes.client.ApiClient (admin); build typed APIs from it: CoreV1Api(kube)
  kubectl     kubectl("apply", "-f", path) -> CompletedProcess, admin kubeconfig
  node_agent  NodeAgentView: pod_dir(), container_log(), container_pid()
  namespace   a fresh namespace per test, ready for pods, deleted afterwards
  assets      paths of every binary (kubectl, helm, prometheus, promtool, ...)

Wait with tests.support.waiting.wait_for (bounded polling), never with sleeps. Mark every test
module with `pytestmark = pytest.mark.integration`.
"""
