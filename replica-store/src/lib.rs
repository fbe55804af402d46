//! Chunk-addressed replica store (chunks, manifests, recovery points, backends).
