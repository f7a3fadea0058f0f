//! Which recovery points are kept: a policy of tiers, each "one point per EVERY, for the
//! last FOR" (the default: every 10 minutes for the last hour, hourly for 24 hours, daily
//! for 7 days), as the DR systems blockferry replaces keep them. The newest point is always
//! kept, whatever its age: it is the one a cutover would launch, and the parent of the
//! next EBS snapshot.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// Tiers of a policy at most.
pub const MAX_TIERS: usize = 8;

/// One point per `every_ms` (the newest in each such interval of the clock), for points
/// cut in the last `for_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub every_ms: u64,
    pub for_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub tiers: Vec<Tier>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            tiers: vec![
                Tier {
                    every_ms: 10 * MINUTE,
                    for_ms: HOUR,
                },
                Tier {
                    every_ms: HOUR,
                    for_ms: DAY,
                },
                Tier {
                    every_ms: DAY,
                    for_ms: 7 * DAY,
                },
            ],
        }
    }
}

impl RetentionPolicy {
    /// The epochs of `points` ((epoch, Unix ms of the cut), any order) that the policy
    /// keeps at `now_ms`.
    pub fn keep(&self, points: &[(u64, u64)], now_ms: u64) -> BTreeSet<u64> {
        let mut newest_first: Vec<(u64, u64)> = points.to_vec();
        newest_first.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        let mut kept = BTreeSet::new();
        if let Some(&(epoch, _)) = newest_first.first() {
            kept.insert(epoch);
        }
        for tier in &self.tiers {
            let mut bucket = None;
            for &(epoch, at) in &newest_first {
                if now_ms.saturating_sub(at) >= tier.for_ms {
                    break;
                }
                // The newest point of each interval of the clock.
                let this = at / tier.every_ms.max(1);
                if bucket != Some(this) {
                    bucket = Some(this);
                    kept.insert(epoch);
                }
            }
        }
        kept
    }
}

/// Why a policy given as text is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "retention {text:?}: {why}; write tiers EVERY:FOR separated by commas, with durations like 10m, 1h, 7d (e.g. 10m:1h,1h:24h,1d:7d)"
)]
pub struct BadPolicy {
    text: String,
    why: String,
}

impl FromStr for RetentionPolicy {
    type Err = BadPolicy;

    fn from_str(text: &str) -> Result<Self, BadPolicy> {
        let bad = |why: String| BadPolicy {
            text: text.to_owned(),
            why,
        };
        let tiers = text
            .split(',')
            .map(|tier| {
                let (every, span) = tier
                    .split_once(':')
                    .ok_or_else(|| bad(format!("tier {tier:?} has no ':'")))?;
                let (every_ms, for_ms) = (duration(every).map_err(&bad)?, duration(span).map_err(&bad)?);
                if every_ms > for_ms {
                    return Err(bad(format!(
                        "tier {tier:?} keeps one point per {every}, longer than the {span} it covers"
                    )));
                }
                Ok(Tier { every_ms, for_ms })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if tiers.len() > MAX_TIERS {
            return Err(bad(format!("{} tiers; at most {MAX_TIERS}", tiers.len())));
        }
        Ok(Self { tiers })
    }
}

fn duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration"))?;
    let unit_ms = match unit {
        "m" => MINUTE,
        "h" => HOUR,
        "d" => DAY,
        _ => return Err(format!("{text:?}: the unit is m, h or d")),
    };
    match number.checked_mul(unit_ms) {
        Some(0) => Err(format!("{text:?} is no time at all")),
        Some(ms) if ms <= 3650 * DAY => Ok(ms),
        _ => Err(format!("{text:?} is more than ten years")),
    }
}

impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn show(ms: u64) -> String {
            if ms.is_multiple_of(DAY) {
                format!("{}d", ms / DAY)
            } else if ms.is_multiple_of(HOUR) {
                format!("{}h", ms / HOUR)
            } else {
                format!("{}m", ms / MINUTE)
            }
        }
        let tiers: Vec<String> = self
            .tiers
            .iter()
            .map(|t| format!("{}:{}", show(t.every_ms), show(t.for_ms)))
            .collect();
        f.write_str(&tiers.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A point cut every `step` from `start` to `end` (Unix ms), epochs counting up.
    fn cuts(start: u64, end: u64, step: u64) -> Vec<(u64, u64)> {
        (0..)
            .map(|i| (i + 1, start + i * step))
            .take_while(|&(_, at)| at <= end)
            .collect()
    }

    #[test]
    fn a_weeks_cuts_every_minute_keep_exactly_the_default_policys_points() {
        let now = 100 * DAY;
        let points = cuts(now - 10 * DAY, now, MINUTE);
        let kept = RetentionPolicy::default().keep(&points, now);
        let at = |epoch: u64| points[(epoch - 1) as usize].1;

        // The newest, then one per 10-minute interval of the last hour (the newest point
        // of each), one per hour of the last day, one per day of the last week.
        let mut expected = BTreeSet::new();
        expected.insert(points.last().unwrap().0);
        for (every, span) in [(10 * MINUTE, HOUR), (HOUR, DAY), (DAY, 7 * DAY)] {
            let mut seen = BTreeSet::new();
            for &(epoch, cut) in points.iter().rev() {
                if now - cut >= span {
                    break;
                }
                if seen.insert(cut / every) {
                    expected.insert(epoch);
                }
            }
        }
        assert_eq!(kept, expected);
        // 6 + 24 + 7 intervals, give or take the partial ones at each tier's edges, and
        // some points serve two tiers.
        assert!((30..=40).contains(&kept.len()), "{} kept", kept.len());
        assert!(
            kept.iter().all(|&e| now - at(e) < 7 * DAY),
            "nothing older than a week"
        );
        let day_ago = kept.iter().filter(|&&e| now - at(e) > DAY).count();
        assert!(
            (6..=7).contains(&day_ago),
            "{day_ago} daily points beyond the last day"
        );
        let last_hour = kept.iter().filter(|&&e| now - at(e) < HOUR).count();
        assert!(
            (6..=7).contains(&last_hour),
            "{last_hour} points in the last hour"
        );
    }

    #[test]
    fn deleting_what_the_policy_drops_never_changes_what_it_keeps_later() {
        let policy: RetentionPolicy = "10m:1h,1h:1d".parse().unwrap();
        let (mut all, mut pruned) = (Vec::new(), Vec::new());
        // A cut every 5 minutes for two days; after each, the points dropped are deleted.
        for i in 0..(2 * 24 * 12) {
            let now = 10 * DAY + i * 5 * MINUTE;
            all.push((i + 1, now));
            pruned.push((i + 1, now));
            let kept = policy.keep(&pruned, now);
            assert_eq!(
                kept,
                policy.keep(&all, now),
                "after {i} cuts, the deletions changed the policy's choice"
            );
            assert!(kept.contains(&(i + 1)), "the newest is kept");
            pruned.retain(|(e, _)| kept.contains(e));
        }
        assert!(pruned.len() <= 6 + 24 + 2, "{} points kept", pruned.len());
        assert!(pruned.len() >= 6 + 23, "{} points kept", pruned.len());
    }

    #[test]
    fn the_newest_point_is_kept_however_old() {
        let policy = RetentionPolicy::default();
        let kept = policy.keep(&[(3, 0), (4, 1000)], 365 * DAY);
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), [4]);
        assert!(policy.keep(&[], 0).is_empty());
    }

    #[test]
    fn policies_read_as_they_print_and_bad_ones_say_how_to_write_them() {
        let policy: RetentionPolicy = "10m:1h,1h:24h,1d:7d".parse().unwrap();
        assert_eq!(policy, RetentionPolicy::default());
        assert_eq!(policy.to_string(), "10m:1h,1h:1d,1d:7d");
        assert_eq!(
            policy.to_string().parse::<RetentionPolicy>().unwrap(),
            policy
        );
        for (text, why) in [
            ("10m", "no ':'"),
            ("10s:1h", "unit is m, h or d"),
            ("0m:1h", "no time at all"),
            ("2h:1h", "longer than"),
            ("1m:99999d", "ten years"),
            ("x:1h", "not a duration"),
            (
                "1m:1h,1m:1h,1m:1h,1m:1h,1m:1h,1m:1h,1m:1h,1m:1h,1m:1h",
                "at most 8",
            ),
        ] {
            let err = text.parse::<RetentionPolicy>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains("EVERY:FOR"), "{text}: {err}");
        }
    }
}
