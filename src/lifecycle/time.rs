//! Wall-clock timestamps for container state and logs: RFC 3339 in UTC with nanoseconds,
//! as Docker writes them (`2024-05-01T12:00:00.123456789Z`), and Docker's human durations
//! ("5 seconds", "About a minute") for `ps`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, nanoseconds since the Unix epoch, stored as RFC 3339 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(u128);

const NANOS: u128 = 1_000_000_000;
const DAY: u128 = 86_400;

impl Timestamp {
    /// Now, by the system clock (the epoch itself if the clock is before it).
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self(since.as_nanos())
    }

    /// How long ago this was (zero if it is in the future).
    pub fn elapsed(self) -> Duration {
        let nanos = Self::now().0.saturating_sub(self.0);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0 / NANOS;
        let nanos = self.0 % NANOS;
        let (days, rest) = (secs / DAY, secs % DAY);
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
            rest / 3600,
            rest / 60 % 60,
            rest % 60
        )
    }

    /// Parses what [`to_rfc3339`](Self::to_rfc3339) writes (any fraction length, or none).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.strip_suffix('Z')?;
        let (date, clock) = text.split_once('T')?;
        let mut date = date.splitn(3, '-').map(|p| p.parse::<u128>().ok());
        let (year, month, day) = (date.next()??, date.next()??, date.next()??);
        let (clock, fraction) = clock.split_once('.').unwrap_or((clock, ""));
        let mut clock = clock.splitn(3, ':').map(|p| p.parse::<u128>().ok());
        let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1970 {
            return None;
        }
        if hour > 23 || minute > 59 || second > 60 || fraction.len() > 9 {
            return None;
        }
        let nanos = if fraction.is_empty() {
            0
        } else {
            let digits: u128 = fraction.parse().ok()?;
            digits * 10u128.pow(9 - u32::try_from(fraction.len()).ok()?)
        };
        let days = days_from_civil(year, month, day);
        let secs = days * DAY + hour * 3600 + minute * 60 + second;
        Some(Self(secs * NANOS + nanos))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 UTC time"))
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u128) -> (u128, u128, u128) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u128::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`], for years from 1970.
fn days_from_civil(year: u128, month: u128, day: u128) -> u128 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let yoe = year % 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Docker's `HumanDuration` (go-units): "Less than a second", "5 seconds", "About a minute",
/// "3 minutes", "About an hour", "2 hours", "3 days", "2 weeks", "4 months", "2 years".
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let minutes = seconds / 60;
    let hours = minutes / 60;
    match seconds {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        2..60 => format!("{seconds} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let epoch = Timestamp(0);
        assert_eq!(epoch.to_rfc3339(), "1970-01-01T00:00:00.000000000Z");
        // 2024-02-29T23:59:59.123456789Z, a leap day.
        let leap = Timestamp(1_709_251_199 * NANOS + 123_456_789);
        assert_eq!(leap.to_rfc3339(), "2024-02-29T23:59:59.123456789Z");
        assert_eq!(Timestamp::parse(&leap.to_rfc3339()), Some(leap));
        let now = Timestamp::now();
        assert_eq!(Timestamp::parse(&now.to_rfc3339()), Some(now));
        assert_eq!(
            Timestamp::parse("2000-03-01T00:00:01.5Z"),
            Some(Timestamp(951_868_801 * NANOS + 500_000_000))
        );
        assert_eq!(
            Timestamp::parse("2000-03-01T00:00:01Z"),
            Some(Timestamp(951_868_801 * NANOS))
        );
    }

    #[test]
    fn bad_times_are_refused() {
        for bad in [
            "",
            "2024-01-01T00:00:00",
            "2024-13-01T00:00:00Z",
            "2024-01-01 00:00:00Z",
            "2024-01-01T24:00:00Z",
            "x-01-01T00:00:00Z",
            "2024-01-01T00:00:00.1234567890Z",
        ] {
            assert_eq!(Timestamp::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_read_like_dockers() {
        let secs = Duration::from_secs;
        assert_eq!(
            human_duration(Duration::from_millis(300)),
            "Less than a second"
        );
        assert_eq!(human_duration(secs(1)), "1 second");
        assert_eq!(human_duration(secs(5)), "5 seconds");
        assert_eq!(human_duration(secs(90)), "About a minute");
        assert_eq!(human_duration(secs(600)), "10 minutes");
        assert_eq!(human_duration(secs(3600)), "About an hour");
        assert_eq!(human_duration(secs(5 * 3600)), "5 hours");
        assert_eq!(human_duration(secs(3 * 86_400)), "3 days");
        assert_eq!(human_duration(secs(20 * 86_400)), "2 weeks");
        assert_eq!(human_duration(secs(90 * 86_400)), "3 months");
        assert_eq!(human_duration(secs(800 * 86_400)), "2 years");
    }
}
