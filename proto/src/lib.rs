//! The gRPC contracts KubeBao serves, generated from `proto/` (wire-identical to upstream), and
//! the private unix socket they are served on.

pub mod socket;

/// Kubernetes KMS v2 (`k8s.io/kms/apis/v2`), served by the KMS plugin.
pub mod kms {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("v2");
}

/// Secrets Store CSI driver provider API (`v1alpha1`), served by the CSI provider.
pub mod csi {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("v1alpha1");
}
