//! Obtains and renews this workload's certificate: a fresh in-memory key and CSR, the
//! identity token as proof, `Identity/Certify`, then an atomic swap in the [`CertStore`].
//! Renewal happens at ~70% of the lifetime (with jitter, so a fleet started together
//! does not renew together); failures retry with capped exponential backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;
use weft_api::identity::identity_client::IdentityClient;
use weft_api::identity::CertifyRequest;
use weft_certs::{CertStore, SpiffeId, WorkloadKey};

use crate::metrics::Metrics;

/// Tokens are JWTs or short random strings; anything larger is a misconfiguration.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading identity token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity token {0} is empty or larger than 64 KiB")]
    TokenSize(PathBuf),
    #[error("control plane refused the certificate request: {0}")]
    Refused(tonic::Status),
    #[error("certificate handling: {0}")]
    Certs(#[from] weft_certs::Error),
    #[error("control plane returned an expiry in the past or out of range: {0}")]
    BadExpiry(i64),
}

pub struct Identity {
    client: IdentityClient<Channel>,
    id: SpiffeId,
    token_file: PathBuf,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
}

impl Identity {
    pub fn new(
        channel: Channel,
        store: Arc<CertStore>,
        token_file: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Self {
        Identity {
            client: IdentityClient::new(channel),
            id: store.identity().clone(),
            token_file,
            store,
            metrics,
        }
    }

    /// Runs forever: certify, sleep until renewal, repeat.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        loop {
            let now = SystemTime::now();
            match self.certify().await {
                Ok(not_after) => {
                    backoff.reset();
                    self.metrics.control_plane_connected.set(1);
                    let wait = renewal_delay(now, not_after, rand::rng().random_range(0.65..0.75));
                    tracing::info!(identity = %self.id, expires_in_secs = not_after.duration_since(now).unwrap_or_default().as_secs(), renew_in_secs = wait.as_secs(), "certified");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    if matches!(e, IdentityError::Refused(_)) {
                        self.metrics.control_plane_connected.set(0);
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(identity = %self.id, error = %e, retry_in_ms = wait.as_millis() as u64, "certification failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn certify(&mut self) -> Result<SystemTime, IdentityError> {
        let token = read_token(&self.token_file).await?;
        let key = WorkloadKey::generate()?;
        let csr_der = key.csr_der(&self.id)?;
        let resp = self
            .client
            .certify(CertifyRequest {
                identity: self.id.to_string(),
                token,
                csr_der,
            })
            .await
            .map_err(IdentityError::Refused)?
            .into_inner();
        let secs = u64::try_from(resp.not_after_unix)
            .map_err(|_| IdentityError::BadExpiry(resp.not_after_unix))?;
        let not_after = UNIX_EPOCH + Duration::from_secs(secs);
        if not_after <= SystemTime::now() {
            return Err(IdentityError::BadExpiry(resp.not_after_unix));
        }
        let certified = key.certified_key(resp.leaf_der, resp.chain_der)?;
        self.store.install(certified, not_after);
        self.metrics.cert_expiry.set(resp.not_after_unix);
        Ok(not_after)
    }
}

async fn read_token(path: &PathBuf) -> Result<Vec<u8>, IdentityError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|source| IdentityError::Token {
            path: path.clone(),
            source,
        })?;
    let mut token = Vec::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut token)
        .await
        .map_err(|source| IdentityError::Token {
            path: path.clone(),
            source,
        })?;
    // Sent byte for byte (no trimming): the control plane hashes exactly what the file holds.
    if token.is_empty() || token.len() as u64 > MAX_TOKEN_BYTES {
        return Err(IdentityError::TokenSize(path.clone()));
    }
    Ok(token)
}

/// Time until renewal: `fraction` of the certificate's remaining lifetime as seen at `issued`.
fn renewal_delay(issued: SystemTime, not_after: SystemTime, fraction: f64) -> Duration {
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    lifetime.mul_f64(fraction.clamp(0.0, 1.0))
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let cap = exp.min(self.max);
        cap.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_fraction_of_lifetime() {
        let now = SystemTime::now();
        let d = renewal_delay(now, now + Duration::from_secs(100), 0.7);
        assert_eq!(d, Duration::from_secs(70));
        assert_eq!(
            renewal_delay(now, now - Duration::from_secs(1), 0.7),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(100) && first >= Duration::from_millis(50));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn token_is_trimmed_and_bounded() {
        let dir = std::env::temp_dir().join(format!("weft-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("ok");
        std::fs::write(&ok, b"secret\n").unwrap();
        assert_eq!(read_token(&ok).await.unwrap(), b"secret\n");
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            read_token(&empty).await,
            Err(IdentityError::TokenSize(_))
        ));
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 70 * 1024]).unwrap();
        assert!(matches!(
            read_token(&big).await,
            Err(IdentityError::TokenSize(_))
        ));
        assert!(matches!(
            read_token(&dir.join("missing")).await,
            Err(IdentityError::Token { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
