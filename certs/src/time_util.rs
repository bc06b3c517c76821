//! Conversions between `SystemTime` and X.509 validity times (whole seconds, UTC).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

use crate::Error;

/// Seconds since the Unix epoch, negative before it.
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

pub(crate) fn from_unix_seconds(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Drops sub-second precision: certificates carry whole seconds, and the `not_after` we report
/// must equal the one written into the certificate.
pub(crate) fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    from_unix_seconds(unix_seconds(t))
}

pub(crate) fn to_offset_date_time(t: SystemTime) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(unix_seconds(t))
        .map_err(|e| Error::Lifetime(format!("time out of range for a certificate: {e}")))
}

/// A validity window `[now - skew, min(now + lifetime, cap)]`, in whole seconds.
pub(crate) struct Validity {
    pub(crate) not_before: OffsetDateTime,
    pub(crate) not_after: OffsetDateTime,
    pub(crate) not_after_system: SystemTime,
}

/// Backdating absorbs clock skew between the signer and the peers that check the certificate.
pub(crate) const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

pub(crate) fn validity(lifetime: Duration, cap: Option<SystemTime>) -> Result<Validity, Error> {
    if lifetime.is_zero() {
        return Err(Error::Lifetime("lifetime must be positive".into()));
    }
    let now = SystemTime::now();
    let not_before = now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now);
    let wanted = match (now.checked_add(lifetime), cap) {
        (Some(wanted), Some(cap)) => wanted.min(cap),
        (Some(wanted), None) => wanted,
        (None, Some(cap)) => cap,
        (None, None) => return Err(Error::Lifetime(format!("lifetime {lifetime:?} overflows"))),
    };
    let not_after_system = truncate_to_seconds(wanted);
    if not_after_system <= now {
        return Err(Error::IssuerExpired {
            not_after_unix: unix_seconds(not_after_system),
        });
    }
    Ok(Validity {
        not_before: to_offset_date_time(not_before)?,
        not_after: to_offset_date_time(not_after_system)?,
        not_after_system,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_round_trip_including_before_epoch() {
        for secs in [-86_400, -1, 0, 1, 1_700_000_000] {
            assert_eq!(unix_seconds(from_unix_seconds(secs)), secs);
        }
    }

    #[test]
    fn validity_is_capped_and_truncated() {
        let cap = SystemTime::now() + Duration::from_secs(3600);
        let v = validity(Duration::from_secs(86_400), Some(cap)).unwrap();
        assert_eq!(v.not_after_system, truncate_to_seconds(cap));
        assert_eq!(
            v.not_after.unix_timestamp(),
            unix_seconds(v.not_after_system)
        );
        assert!(v.not_before.unix_timestamp() < unix_seconds(SystemTime::now()) - 59);
    }

    #[test]
    fn validity_rejects_expired_cap_and_zero_lifetime() {
        let past = SystemTime::now() - Duration::from_secs(10);
        assert!(matches!(
            validity(Duration::from_secs(60), Some(past)),
            Err(Error::IssuerExpired { .. })
        ));
        assert!(matches!(
            validity(Duration::ZERO, None),
            Err(Error::Lifetime(_))
        ));
        assert!(matches!(
            validity(Duration::MAX, None),
            Err(Error::Lifetime(_))
        ));
    }
}
