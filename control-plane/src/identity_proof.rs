//! What an identity token proves: either a standalone bootstrap token (its SHA-256 is a pod
//! annotation, found via the index) or, in a cluster, a Kubernetes ServiceAccount token that
//! the API server vouches for through a TokenReview.
//!
//! RBAC: the TokenReview path needs `create` on `tokenreviews` (group
//! `authentication.k8s.io`), usually granted by binding `system:auth-delegator`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::Api;
use weft_certs::SpiffeId;

use crate::index::Index;
use crate::model::TokenError;

/// The audience a workload's projected token must be minted for, so that a token meant for
/// some other service cannot be replayed here.
pub const TOKEN_AUDIENCE: &str = "identity.weft.io";
/// A TokenReview that takes longer than this is treated as the API server being unreachable.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token proves nothing. The messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The token is not valid (unknown, expired, wrong audience, not a service account).
    #[error("{0}")]
    Unauthenticated(String),
    /// The token is valid but cannot prove a single identity.
    #[error("{0}")]
    PermissionDenied(String),
    /// The token could not be checked right now (the API server did not answer).
    #[error("{0}")]
    Unavailable(String),
}

/// How `Certify` checks a token.
#[derive(Clone)]
pub enum TokenVerifier {
    /// Standalone: the token's SHA-256 is annotated on the pod(s) of one identity.
    Bootstrap(Arc<Index>),
    /// In a cluster: the API server reviews a ServiceAccount token minted for [`TOKEN_AUDIENCE`].
    TokenReview(kube::Client),
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenVerifier::Bootstrap(_) => f.write_str("TokenVerifier::Bootstrap"),
            TokenVerifier::TokenReview(_) => f.write_str("TokenVerifier::TokenReview"),
        }
    }
}

impl TokenVerifier {
    /// The identity `token` proves in `trust_domain`.
    pub async fn verify(&self, token: &[u8], trust_domain: &str) -> Result<SpiffeId, ProofError> {
        match self {
            TokenVerifier::Bootstrap(index) => index
                .snapshot()
                .identity_for_token(token, trust_domain)
                .map_err(|e| match e {
                    TokenError::Unknown => {
                        ProofError::Unauthenticated("identity token not recognised".to_owned())
                    }
                    TokenError::Ambiguous => ProofError::PermissionDenied(
                        "identity token is shared by pods with different identities; give each workload its own token"
                            .to_owned(),
                    ),
                }),
            TokenVerifier::TokenReview(client) => {
                token_review(client.clone(), token, trust_domain).await
            }
        }
    }
}

async fn token_review(
    client: kube::Client,
    token: &[u8],
    trust_domain: &str,
) -> Result<SpiffeId, ProofError> {
    let token = std::str::from_utf8(token)
        .map_err(|_| ProofError::Unauthenticated("identity token is not text".to_owned()))?
        .trim();
    if token.is_empty() {
        return Err(ProofError::Unauthenticated(
            "empty identity token".to_owned(),
        ));
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
        },
        ..TokenReview::default()
    };
    let api: Api<TokenReview> = Api::all(client);
    let reviewed =
        match tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
            .await
        {
            Err(_) => {
                return Err(ProofError::Unavailable(
                    "the Kubernetes API server did not answer the TokenReview in time".to_owned(),
                ))
            }
            // `kube::Error` describes the request, never its body: safe to show.
            Ok(Err(e)) => return Err(ProofError::Unavailable(format!("TokenReview failed: {e}"))),
            Ok(Ok(reviewed)) => reviewed,
        };
    identity_from_review(reviewed.status.unwrap_or_default(), trust_domain)
}

/// Checks a TokenReview's verdict and maps `system:serviceaccount:<ns>:<sa>` to its SPIFFE ID.
pub fn identity_from_review(
    status: k8s_openapi::api::authentication::v1::TokenReviewStatus,
    trust_domain: &str,
) -> Result<SpiffeId, ProofError> {
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".to_owned());
        return Err(ProofError::Unauthenticated(format!(
            "identity token rejected by the API server: {reason}"
        )));
    }
    // An API server that ignores spec.audiences answers with none: that is no proof that the
    // token was minted for us.
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == TOKEN_AUDIENCE)
    {
        return Err(ProofError::Unauthenticated(format!(
            "identity token is not for audience {TOKEN_AUDIENCE}"
        )));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
        return Err(ProofError::Unauthenticated(format!(
            "identity token belongs to {username:?}, not to a service account"
        )));
    };
    let Some((namespace, account)) = rest.split_once(':') else {
        return Err(ProofError::Unauthenticated(format!(
            "unexpected service account user name {username:?}"
        )));
    };
    SpiffeId::new(trust_domain, namespace, account).map_err(|e| {
        ProofError::Unauthenticated(format!(
            "service account {namespace}/{account} is not a valid identity: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    fn status(authenticated: bool, audiences: &[&str], username: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn service_account_user_maps_to_its_spiffe_id() {
        let id = identity_from_review(
            status(true, &[TOKEN_AUDIENCE], "system:serviceaccount:shop:web"),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn unauthenticated_wrong_audience_and_non_service_accounts_are_refused() {
        let cases = [
            status(false, &[TOKEN_AUDIENCE], "system:serviceaccount:shop:web"),
            status(
                true,
                &["https://kubernetes.default.svc"],
                "system:serviceaccount:shop:web",
            ),
            status(true, &[], "system:serviceaccount:shop:web"),
            status(true, &[TOKEN_AUDIENCE], "alice"),
            status(true, &[TOKEN_AUDIENCE], "system:serviceaccount:shop"),
            status(
                true,
                &[TOKEN_AUDIENCE],
                "system:serviceaccount:shop:web:extra",
            ),
            status(true, &[TOKEN_AUDIENCE], "system:serviceaccount::web"),
            status(true, &[TOKEN_AUDIENCE], "system:serviceaccount:Shop:web"),
            status(true, &[TOKEN_AUDIENCE], "system:serviceaccount:shop/x:web"),
            status(true, &[TOKEN_AUDIENCE], ""),
        ];
        for case in cases {
            let err = identity_from_review(case.clone(), "cluster.local").unwrap_err();
            assert!(
                matches!(err, ProofError::Unauthenticated(_)),
                "{case:?}: {err:?}"
            );
        }
    }
}
