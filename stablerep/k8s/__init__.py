"""Kubernetes: manifests for training (PyTorchJob, TrainJob) and generation (Indexed Job).

:mod:`stablerep.k8s.config` holds the typed cluster config, :mod:`stablerep.k8s.manifests`
turns it into plain dicts ready for ``kubectl apply`` or the Kubernetes client, and
:mod:`stablerep.k8s.validate` checks the rules the operators' admission webhooks enforce
beyond their CRD schemas, and :mod:`stablerep.k8s.rules` the API server's own rules for
tolerations, labels, names, image references and counts, so a bad job fails here, before
anything is created; :mod:`stablerep.k8s.access` checks the kubeconfig and the API server.
"""

from stablerep.k8s.config import ClusterConfig, GenerationJobConfig
from stablerep.k8s.manifests import generation_job, launcher_rbac, pytorchjob, trainjob
from stablerep.k8s.validate import check_manifest

__all__ = ["ClusterConfig", "GenerationJobConfig", "check_manifest", "generation_job",
           "launcher_rbac", "pytorchjob", "trainjob"]
