//! Who is notified of a message (`API.md` §13), as pure functions of the recipient's
//! preferences, the message, and the time: no state, no I/O, no clock of their own.
//!
//! A member other than the author is notified by push (or in an email digest) when the
//! level that applies (the channel's, else `prefs.push` or `prefs.email`) matches the
//! message: `all` always, `mentions` for a mention of them, `@channel`, `@here` while they
//! are online, one of their keywords (a whole word, any case), or any message of a DM or
//! group DM; `none` never. A muted channel notifies nothing, and neither does a user in
//! do-not-disturb, by mode or by their weekly schedule in their own time zone.
//!
//! What these functions do not decide, because it is not in their inputs: whether the user
//! has a connection in the `active` state, and whether they have read the message by the
//! time it would go out. The decider (`chorus-notify`) calls these functions off the send
//! path and asks presence for the first; its push and email senders ask read state for the
//! second.

use super::{ChannelLevel, ChannelPrefs, DndSchedule, Level, NotifyPrefs};
use crate::domain::event::Mentions;
use crate::ids::UserId;
use jiff::civil::Date;
use jiff::Timestamp;

/// A message as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The author, who is never notified.
    pub author: UserId,
    /// The text (empty for an encrypted message: no keyword matches it).
    pub text: &'a str,
    /// The mentions parsed from the text.
    pub mentions: &'a Mentions,
    /// Whether the channel is a DM or a group DM.
    pub direct: bool,
}

/// One member, as the rules see them.
#[derive(Clone, Copy, Debug)]
pub struct Recipient<'a> {
    /// The member.
    pub user: UserId,
    /// Their preferences.
    pub prefs: &'a NotifyPrefs,
    /// Their preferences for the message's channel.
    pub channel: ChannelPrefs,
    /// Whether their presence is online (for `@here`).
    pub online: bool,
    /// Whether their presence mode is `dnd` now.
    pub dnd_mode: bool,
}

/// What one member gets for one message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// A push to their devices.
    pub push: bool,
    /// A place in their next email digest.
    pub email: bool,
}

/// Decides whether a member is notified of a message at `now`.
pub fn decide(r: &Recipient<'_>, m: &Message<'_>, now: Timestamp) -> Decision {
    if r.user == m.author || r.channel.muted || in_dnd(r.dnd_mode, r.prefs, now) {
        return Decision::default();
    }
    let concerned = concerns(r, m);
    Decision {
        push: wants(level(r.channel, r.prefs.push), concerned),
        email: wants(level(r.channel, r.prefs.email), concerned),
    }
}

/// The level that applies: the channel's own, else the user's.
pub fn level(channel: ChannelPrefs, user: Level) -> Level {
    match channel.level {
        ChannelLevel::Default => user,
        ChannelLevel::Is(l) => l,
    }
}

/// Whether a level lets a message through; `concerned` is whether it is a mention, a
/// keyword or a direct message for this user.
pub fn wants(level: Level, concerned: bool) -> bool {
    match level {
        Level::All => true,
        Level::Mentions => concerned,
        Level::None => false,
    }
}

/// Whether the message is for this user in particular: a DM, a mention, or a keyword.
pub fn concerns(r: &Recipient<'_>, m: &Message<'_>) -> bool {
    m.direct || mentioned(r.user, m.mentions, r.online) || keyword_in(&r.prefs.keywords, m.text)
}

/// Whether the mentions name this user: by ID, `@channel`, or `@here` while online.
pub fn mentioned(user: UserId, mentions: &Mentions, online: bool) -> bool {
    mentions.channel || (mentions.here && online) || mentions.users.contains(&user)
}

/// Whether any keyword is in the text as a whole word, ignoring case.
pub fn keyword_in(keywords: &[String], text: &str) -> bool {
    !keywords.is_empty() && keyword_in_lowercase(keywords, &text.to_lowercase())
}

/// [`keyword_in`] for a text already in lowercase: a message's text is lowered once for
/// all the members whose keywords are tried on it.
pub fn keyword_in_lowercase(keywords: &[String], text: &str) -> bool {
    !text.is_empty()
        && keywords
            .iter()
            .any(|k| whole_word_in(text, &k.to_lowercase()))
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `needle` occurs in `haystack` with no word character joined to it: a keyword
/// that starts (ends) with a word character must not follow (precede) one. Both are
/// lowercase already.
pub fn whole_word_in(haystack: &str, needle: &str) -> bool {
    let (Some(first), Some(last)) = (needle.chars().next(), needle.chars().next_back()) else {
        return false;
    };
    haystack.match_indices(needle).any(|(at, _)| {
        let before = haystack[..at].chars().next_back();
        let after = haystack[at + needle.len()..].chars().next();
        let open = !is_word_char(first) || !before.is_some_and(is_word_char);
        let close = !is_word_char(last) || !after.is_some_and(is_word_char);
        open && close
    })
}

/// Whether the user is in do-not-disturb at `now`: by mode, or by schedule.
pub fn in_dnd(mode: bool, prefs: &NotifyPrefs, now: Timestamp) -> bool {
    mode || prefs
        .dnd_schedule
        .as_ref()
        .is_some_and(|s| in_schedule(s, now))
}

/// Whether `now` falls in a weekly window. A window starts on each of its days at `start`
/// local time and ends at the next `end` local time (the next day's when `end` is before
/// `start`). Local times are turned into instants the way RFC 5545 and Temporal do: a time
/// skipped by a DST change moves forward by the gap, and a time that happens twice is
/// its first occurrence.
pub fn in_schedule(s: &DndSchedule, now: Timestamp) -> bool {
    // Validated when stored, against the same compiled-in database.
    let Ok(tz) = super::time_zone(&s.tz) else {
        return false;
    };
    let today = tz.to_datetime(now).date();
    // A window that includes `now` started today, or (running past midnight) yesterday.
    [today.yesterday().ok(), Some(today)]
        .into_iter()
        .flatten()
        .filter(|day| s.starts_on(day.weekday().to_monday_zero_offset() as usize))
        .any(|day| {
            let end_day = if s.end_min < s.start_min {
                day.tomorrow().ok()
            } else {
                Some(day)
            };
            let start = instant(day, s.start_min, &tz);
            let end = end_day.and_then(|d| instant(d, s.end_min, &tz));
            matches!((start, end), (Some(a), Some(b)) if a <= now && now < b)
        })
}

/// The instant of a local time on a local day in a zone.
fn instant(day: Date, min: u16, tz: &jiff::tz::TimeZone) -> Option<Timestamp> {
    let (h, m) = ((min / 60) as i8, (min % 60) as i8);
    tz.to_timestamp(day.at(h, m, 0, 0)).ok()
}

#[cfg(test)]
mod tests {
    use super::super::{DndSchedule, NotifyPrefs, ScheduleInput};
    use super::*;

    const ALICE: UserId = UserId(1);
    const BOB: UserId = UserId(2);

    fn at(rfc3339: &str) -> Timestamp {
        rfc3339.parse().expect("a timestamp")
    }

    fn sched(tz: &str, days: &[&str], start: &str, end: &str) -> DndSchedule {
        DndSchedule::parse(ScheduleInput {
            tz: tz.into(),
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            end: end.into(),
        })
        .expect("a valid schedule")
    }

    fn prefs(push: Level, email: Level) -> NotifyPrefs {
        NotifyPrefs {
            push,
            email,
            ..NotifyPrefs::default()
        }
    }

    fn bob<'a>(prefs: &'a NotifyPrefs, channel: ChannelPrefs) -> Recipient<'a> {
        Recipient {
            user: BOB,
            prefs,
            channel,
            online: false,
            dnd_mode: false,
        }
    }

    fn msg<'a>(text: &'a str, mentions: &'a Mentions, direct: bool) -> Message<'a> {
        Message {
            author: ALICE,
            text,
            mentions,
            direct,
        }
    }

    const NOON: &str = "2026-06-03T12:00:00Z";

    fn both(push: bool, email: bool) -> Decision {
        Decision { push, email }
    }

    // Level `all` notifies of every message; `none` of nothing, not even a mention or a DM.
    #[test]
    fn level_all_and_none() {
        let none = Mentions::default();
        let p = prefs(Level::All, Level::None);
        let r = bob(&p, ChannelPrefs::default());
        assert_eq!(
            decide(&r, &msg("hello", &none, false), at(NOON)),
            both(true, false)
        );
        let direct = Mentions {
            users: vec![BOB],
            ..Mentions::default()
        };
        assert_eq!(
            decide(&r, &msg("hi", &direct, true), at(NOON)),
            both(true, false)
        );
    }

    // Level `mentions`: a mention by ID, `@channel`, `@here` for an online member, a
    // keyword, or a DM; nothing else.
    #[test]
    fn level_mentions() {
        let p = NotifyPrefs {
            keywords: vec!["Deploy".into()],
            ..NotifyPrefs::default()
        };
        let mut r = bob(&p, ChannelPrefs::default());
        let none = Mentions::default();
        let me = Mentions {
            users: vec![BOB],
            ..Mentions::default()
        };
        let other = Mentions {
            users: vec![UserId(3)],
            ..Mentions::default()
        };
        let channel = Mentions {
            channel: true,
            ..Mentions::default()
        };
        let here = Mentions {
            here: true,
            ..Mentions::default()
        };
        let now = at(NOON);
        let yes = both(true, true);
        let no = both(false, false);
        assert_eq!(decide(&r, &msg("hello", &none, false), now), no);
        assert_eq!(decide(&r, &msg("hi", &me, false), now), yes);
        assert_eq!(decide(&r, &msg("hi", &other, false), now), no);
        assert_eq!(decide(&r, &msg("all", &channel, false), now), yes);
        assert_eq!(decide(&r, &msg("hello", &none, true), now), yes, "a DM");
        assert_eq!(decide(&r, &msg("about to DEPLOY.", &none, false), now), yes);
        assert_eq!(decide(&r, &msg("redeployed", &none, false), now), no);
        assert_eq!(decide(&r, &msg("here", &here, false), now), no, "offline");
        r.online = true;
        assert_eq!(decide(&r, &msg("here", &here, false), now), yes, "online");
    }

    // The author is never notified of their own message, even when they mention themselves.
    #[test]
    fn author_is_not_notified() {
        let p = prefs(Level::All, Level::All);
        let mut r = bob(&p, ChannelPrefs::default());
        r.user = ALICE;
        let me = Mentions {
            users: vec![ALICE],
            channel: true,
            here: false,
        };
        assert_eq!(
            decide(&r, &msg("hi", &me, true), at(NOON)),
            Decision::default()
        );
    }

    // A channel's own level overrides both of the user's, and `default` defers to them.
    #[test]
    fn channel_level_overrides() {
        let p = prefs(Level::All, Level::None);
        let none = Mentions::default();
        let m = msg("hello", &none, false);
        let set = |l| ChannelPrefs {
            level: ChannelLevel::Is(l),
            muted: false,
        };
        let now = at(NOON);
        assert_eq!(
            decide(&bob(&p, set(Level::None)), &m, now),
            both(false, false)
        );
        assert_eq!(decide(&bob(&p, set(Level::All)), &m, now), both(true, true));
        assert_eq!(
            decide(&bob(&p, set(Level::Mentions)), &m, now),
            both(false, false)
        );
        assert_eq!(
            decide(&bob(&p, ChannelPrefs::default()), &m, now),
            both(true, false)
        );
    }

    // A muted channel notifies nothing, not even a mention in a DM.
    #[test]
    fn muted() {
        let p = prefs(Level::All, Level::All);
        let me = Mentions {
            users: vec![BOB],
            ..Mentions::default()
        };
        let muted = ChannelPrefs {
            level: ChannelLevel::Is(Level::All),
            muted: true,
        };
        assert_eq!(
            decide(&bob(&p, muted), &msg("hi", &me, true), at(NOON)),
            Decision::default()
        );
    }

    // Keywords match whole words in any case, phrases included, and a keyword that ends in
    // punctuation still matches before a space.
    #[test]
    fn keywords_match_whole_words() {
        let k = |ks: &[&str], text: &str| {
            keyword_in(&ks.iter().map(|s| s.to_string()).collect::<Vec<_>>(), text)
        };
        assert!(k(&["deploy"], "Deploy now"));
        assert!(k(&["deploy"], "ok, DEPLOY!"));
        assert!(k(&["deploy"], "(deploy)"));
        assert!(!k(&["deploy"], "redeploy"));
        assert!(!k(&["deploy"], "deploys"));
        assert!(!k(&["deploy"], "deploy_bot"));
        assert!(k(&["deploy"], "deploys or deploy"), "a later occurrence");
        assert!(k(&["on call"], "who is On Call today"));
        assert!(k(&["c++"], "I like C++ a lot"));
        assert!(k(&["Straße"], "DIE STRAßE"));
        assert!(!k(&["café"], "cafés"));
        assert!(!k(&[], "anything"));
        assert!(!k(&["x"], ""));
    }

    // DND by mode drops everything, mentions and DMs included.
    #[test]
    fn dnd_by_mode() {
        let p = prefs(Level::All, Level::All);
        let mut r = bob(&p, ChannelPrefs::default());
        r.dnd_mode = true;
        let me = Mentions {
            users: vec![BOB],
            ..Mentions::default()
        };
        assert_eq!(
            decide(&r, &msg("hi", &me, true), at(NOON)),
            Decision::default()
        );
    }

    // A schedule in a non-UTC zone that crosses midnight: Friday 22:00 to Saturday 07:00 in
    // Tokyo (UTC+9) covers Saturday early morning, which is Friday evening in UTC, and the
    // window belongs to the day it starts on.
    #[test]
    fn dnd_schedule_crossing_midnight() {
        let s = sched("Asia/Tokyo", &["fri"], "22:00", "07:00");
        // 2026-06-05 is a Friday. Friday 22:00 JST = 13:00 UTC.
        assert!(!in_schedule(&s, at("2026-06-05T12:59:59Z")));
        assert!(in_schedule(&s, at("2026-06-05T13:00:00Z")));
        // Saturday 03:00 JST, still Friday's window.
        assert!(in_schedule(&s, at("2026-06-05T18:00:00Z")));
        // Saturday 07:00 JST = Friday 22:00 UTC: the window is over.
        assert!(in_schedule(&s, at("2026-06-05T21:59:59Z")));
        assert!(!in_schedule(&s, at("2026-06-05T22:00:00Z")));
        // Saturday 22:00 JST: Saturday is not a day of the window.
        assert!(!in_schedule(&s, at("2026-06-06T13:30:00Z")));
        // Friday 03:00 JST belongs to Thursday's window, which does not exist.
        assert!(!in_schedule(&s, at("2026-06-04T18:00:00Z")));
        // The same hours in UTC would be a different window.
        let utc = sched("UTC", &["fri"], "22:00", "07:00");
        assert!(!in_schedule(&utc, at("2026-06-05T13:00:00Z")));
        assert!(in_schedule(&utc, at("2026-06-05T22:00:00Z")));
        // The decision follows the schedule.
        let p = NotifyPrefs {
            push: Level::All,
            dnd_schedule: Some(s),
            ..NotifyPrefs::default()
        };
        let none = Mentions::default();
        let r = bob(&p, ChannelPrefs::default());
        let m = msg("hello", &none, false);
        assert_eq!(
            decide(&r, &m, at("2026-06-05T18:00:00Z")),
            Decision::default()
        );
        assert!(decide(&r, &m, at("2026-06-05T22:00:00Z")).push);
    }

    // A window that does not cross midnight is one span on each of its days.
    #[test]
    fn dnd_schedule_same_day() {
        let s = sched("America/New_York", &["mon", "wed"], "12:00", "13:30");
        // 2026-06-01 is a Monday; New York is UTC-4 in June.
        assert!(in_schedule(&s, at("2026-06-01T16:00:00Z")));
        assert!(in_schedule(&s, at("2026-06-01T17:29:59Z")));
        assert!(!in_schedule(&s, at("2026-06-01T17:30:00Z")));
        assert!(!in_schedule(&s, at("2026-06-02T16:30:00Z")), "Tuesday");
        assert!(in_schedule(&s, at("2026-06-03T16:30:00Z")), "Wednesday");
    }

    // DST edges in Paris: on the night clocks go forward (Sunday 2026-03-29, 02:00 CET →
    // 03:00 CEST) a window ending at the skipped 02:30 ends at 03:30 CEST, an hour of real
    // time later than the wall clock suggests but never never-ending; on the night clocks go
    // back (Sunday 2026-10-25, 03:00 CEST → 02:00 CET) it ends at the first 02:30 and does
    // not start again in the repeated hour.
    #[test]
    fn dnd_schedule_across_dst_changes() {
        let s = sched("Europe/Paris", &["sat"], "23:00", "02:30");
        // Spring: Saturday 23:00 CET = 22:00 UTC.
        assert!(!in_schedule(&s, at("2026-03-28T21:59:59Z")));
        assert!(in_schedule(&s, at("2026-03-28T22:00:00Z")));
        // 01:59 CET = 00:59 UTC; then 03:00 CEST = 01:00 UTC.
        assert!(in_schedule(&s, at("2026-03-29T00:59:00Z")));
        assert!(in_schedule(&s, at("2026-03-29T01:29:59Z")), "03:29 CEST");
        assert!(!in_schedule(&s, at("2026-03-29T01:30:00Z")), "03:30 CEST");
        // Autumn: Saturday 23:00 CEST = 21:00 UTC.
        assert!(in_schedule(&s, at("2026-10-24T21:00:00Z")));
        // The first 02:30 (CEST) is 00:30 UTC; the second (CET) 01:30 UTC.
        assert!(in_schedule(&s, at("2026-10-25T00:29:59Z")));
        assert!(!in_schedule(&s, at("2026-10-25T00:30:00Z")));
        assert!(
            !in_schedule(&s, at("2026-10-25T01:15:00Z")),
            "02:15 CET, repeated"
        );
    }
}
