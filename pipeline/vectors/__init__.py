"""Vector algorithms over L2-normalised float32 embeddings (cosine = inner product), as pure
numpy/FAISS functions: index building and kNN search, copy detection and decontamination,
(hierarchical) spherical k-means with balanced sampling, and sample/cluster-based retrieval.
The stages (`pipeline/stages/`) wire these to tables; nothing here reads or writes files."""
from pipeline.vectors.copydetect import (CopyGraph, Decontamination, copy_components, decontaminate,
                                         pick_kept)
from pipeline.vectors.index import IndexSpec, build_index, knn_search
from pipeline.vectors.kmeans import Level, balanced_sample, hierarchical_kmeans, spherical_kmeans
from pipeline.vectors.retrieval import Retrieved, choose_method, cluster_retrieval, sample_retrieval

__all__ = [
    "CopyGraph", "Decontamination", "IndexSpec", "Level", "Retrieved", "balanced_sample", "build_index",
    "choose_method", "cluster_retrieval", "copy_components", "decontaminate", "hierarchical_kmeans",
    "knn_search", "pick_kept", "sample_retrieval", "spherical_kmeans",
]
