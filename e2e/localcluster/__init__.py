"""A local Kubernetes for end-to-end tests and ``make demo``.

The API server is the team's Kubernetes emulator (``tests.kube_emulator``, built on kmock) served
over HTTP; next to it run a StatefulSet controller, a CronJob/Job controller, an ownerReference
garbage collector, a tiny kube-proxy for Services, and a local kubelet that runs every Pod's
container command as a real process on its own loopback address. The real operator runs as a
subprocess (``kvcache-operator run``) against a kubeconfig pointing at the emulator.

Entry points: :class:`e2e.localcluster.cluster.LocalCluster` (tests, ``make demo``) and
``kvcache-operator dev up`` (:mod:`e2e.localcluster.dev`: the same cluster in the background, for
kubectl).
"""
