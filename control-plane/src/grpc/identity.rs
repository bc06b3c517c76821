//! `weft.identity.v1.Identity/Certify`: the token proves an identity (a bootstrap token via
//! the index, or a ServiceAccount token via a TokenReview: see [`TokenVerifier`]); the CSR
//! must ask for exactly that identity; the issuer signs.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use weft_api::identity::identity_server::Identity;
use weft_api::identity::{CertifyRequest, CertifyResponse};
use weft_certs::{CsrError, Issuer};

use crate::identity_proof::{ProofError, TokenVerifier};
use crate::tls_server::PeerInfo;

pub struct IdentityService {
    pub verifier: TokenVerifier,
    pub issuer: Arc<Issuer>,
    pub trust_domain: String,
    pub lifetime: Duration,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let remote = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.remote.to_string())
            .unwrap_or_default();
        let req = request.into_inner();
        // The token itself is never logged: it is a credential. The requested identity is
        // the caller's text, logged quoted (`?`) so that it cannot forge log lines.
        if req.token.is_empty() {
            tracing::warn!(%remote, asked = ?req.identity, "certify refused: no identity token");
            return Err(Status::unauthenticated("no identity token in the request"));
        }
        let proven = match self.verifier.verify(&req.token, &self.trust_domain).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(%remote, asked = ?req.identity, reason = %e, "certify refused");
                return Err(match e {
                    ProofError::Unauthenticated(m) => Status::unauthenticated(m),
                    ProofError::PermissionDenied(m) => Status::permission_denied(m),
                    ProofError::Unavailable(m) => Status::unavailable(m),
                });
            }
        };
        if !req.identity.is_empty() && req.identity != proven.to_string() {
            tracing::warn!(%remote, asked = ?req.identity, %proven, "certify refused: request for another identity");
            return Err(Status::permission_denied(format!(
                "token proves {proven}, not the requested {}",
                req.identity
            )));
        }
        let signed = self
            .issuer
            .sign_csr(&req.csr_der, &proven, self.lifetime)
            .map_err(|e| {
                tracing::warn!(%remote, %proven, error = %e, "certify refused: bad CSR");
                match e {
                    CsrError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
                    CsrError::Signing(_) => Status::internal("signing failed"),
                    _ => Status::invalid_argument(e.to_string()),
                }
            })?;
        let not_after_unix = signed
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        tracing::info!(%remote, identity = %proven, not_after_unix, "certified");
        Ok(Response::new(CertifyResponse {
            leaf_der: signed.leaf_der.to_vec(),
            chain_der: signed.chain_der.iter().map(|c| c.to_vec()).collect(),
            not_after_unix,
        }))
    }
}
