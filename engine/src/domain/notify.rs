//! Notification preferences (`API.md` §13): a user's `prefs`, their per-channel `level`
//! and `muted`, and their push devices; how each is checked, stored and rendered.
//!
//! They live in the metadata state ([`NotifyState`], a part of
//! [`super::meta::MetaState`]) and change through one metadata event,
//! [`super::event::MetaEvent::Notify`], that carries the full resulting value (the whole
//! `prefs` after a `PATCH`, the whole device), so replay only stores what it reads. Every
//! check of client input is here, decided by the metadata owner before anything is
//! written: a value in the log has passed these checks.
//!
//! Their JSON shapes are in [`crate::view`]. [`rules`] holds the pure functions that decide, from these preferences, who is notified
//! of a message; nothing calls them on the send path.

pub mod rules;

use super::event::MetaEvent;
use super::DomainError;
use crate::ids::{ChannelId, DeviceId, UserId};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};

/// Most keywords a user may have.
pub const KEYWORDS_MAX: usize = 50;
/// Longest keyword, in characters.
pub const KEYWORD_CHARS_MAX: usize = 64;
/// Seconds between email digests when the user has not chosen.
pub const EMAIL_DIGEST_S_DEFAULT: u32 = 900;
/// Longest time between email digests: a week.
pub const EMAIL_DIGEST_S_MAX: u32 = 7 * 24 * 3600;
/// Most push devices one user may register.
pub const DEVICES_PER_USER_MAX: usize = 20;
/// Longest `app_id`, in characters (the Matrix push API's limit).
pub const APP_ID_CHARS_MAX: usize = 64;
/// Longest `pushkey`, in bytes (the Matrix push API's limit).
pub const PUSHKEY_BYTES_MAX: usize = 512;
/// The day names of a schedule, Monday first: bit `i` of [`DndSchedule::days`] is day `i`.
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// How much of a channel a user wants to be told about.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(attr(allow(missing_docs)))]
pub enum Level {
    /// Every message.
    All,
    /// Mentions, keywords, and every message of a DM or group DM.
    Mentions,
    /// Nothing.
    None,
}

impl Level {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::All => "all",
            Level::Mentions => "mentions",
            Level::None => "none",
        }
    }

    fn parse(field: &str, s: &str) -> Result<Level, DomainError> {
        match s {
            "all" => Ok(Level::All),
            "mentions" => Ok(Level::Mentions),
            "none" => Ok(Level::None),
            _ => Err(DomainError::Invalid(format!(
                "{field} must be \"all\", \"mentions\" or \"none\""
            ))),
        }
    }
}

/// A channel's level for one user: its own, or the user's `prefs` (`Default`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(attr(allow(missing_docs)))]
pub enum ChannelLevel {
    /// `prefs.push` for pushes and `prefs.email` for email.
    Default,
    /// This level for both.
    Is(Level),
}

impl ChannelLevel {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelLevel::Default => "default",
            ChannelLevel::Is(l) => l.as_str(),
        }
    }

    fn parse(s: &str) -> Result<ChannelLevel, DomainError> {
        match s {
            "default" => Ok(ChannelLevel::Default),
            _ => Level::parse("level", s).map(ChannelLevel::Is).map_err(|_| {
                DomainError::Invalid(
                    "level must be \"default\", \"all\", \"mentions\" or \"none\"".into(),
                )
            }),
        }
    }
}

/// A weekly do-not-disturb window in the user's time zone. `end` before `start` runs past
/// midnight; `days` names the days on which it starts.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct DndSchedule {
    /// An IANA time zone name, as the bundled database spells it.
    pub tz: String,
    /// Bit `i` set: the window starts on day `i` of [`DAY_NAMES`]. Never zero.
    pub days: u8,
    /// Start, in minutes after local midnight (0..1440).
    pub start_min: u16,
    /// End, in minutes after local midnight (0..1440); never equal to `start_min`.
    pub end_min: u16,
}

/// A user's notification preferences (`prefs` of `API.md` §13).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct NotifyPrefs {
    /// Which messages push.
    pub push: Level,
    /// Which messages go into email digests.
    pub email: Level,
    /// Seconds between digests; 0 = never.
    pub email_digest_s: u32,
    /// Words that count as a mention, as the user wrote them; matched whole-word,
    /// case-insensitively.
    pub keywords: Vec<String>,
    /// The weekly do-not-disturb window, if any.
    pub dnd_schedule: Option<DndSchedule>,
}

/// The preferences of a user who never set any.
pub static DEFAULT_PREFS: NotifyPrefs = NotifyPrefs {
    push: Level::Mentions,
    email: Level::Mentions,
    email_digest_s: EMAIL_DIGEST_S_DEFAULT,
    keywords: Vec::new(),
    dnd_schedule: None,
};

impl Default for NotifyPrefs {
    fn default() -> NotifyPrefs {
        DEFAULT_PREFS.clone()
    }
}

/// One user's preferences for one channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ChannelPrefs {
    /// The channel's level.
    pub level: ChannelLevel,
    /// A muted channel notifies nothing.
    pub muted: bool,
}

impl Default for ChannelPrefs {
    fn default() -> ChannelPrefs {
        ChannelPrefs {
            level: ChannelLevel::Default,
            muted: false,
        }
    }
}

/// Where a push device receives pushes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(attr(allow(missing_docs)))]
pub enum Platform {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging.
    Fcm,
    /// Web Push.
    Webpush,
}

impl Platform {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
            Platform::Webpush => "webpush",
        }
    }

    fn parse(s: &str) -> Result<Platform, DomainError> {
        match s {
            "apns" => Ok(Platform::Apns),
            "fcm" => Ok(Platform::Fcm),
            "webpush" => Ok(Platform::Webpush),
            _ => Err(DomainError::Invalid(
                "platform must be \"apns\", \"fcm\" or \"webpush\"".into(),
            )),
        }
    }
}

/// A registered push device.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct PushDevice {
    /// Its ID.
    pub id: DeviceId,
    /// Its owner.
    pub user: UserId,
    /// The push gateway's app ID.
    pub app_id: String,
    /// The device's push key for that app.
    pub pushkey: String,
    /// Its platform.
    pub platform: Platform,
    /// When it was registered, in microseconds since the Unix epoch.
    pub at_us: u64,
}

/// A change of notification preferences, as the metadata log stores it: always the full
/// resulting value.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub enum NotifyChange {
    /// A user's preferences are now these.
    Prefs {
        /// The user.
        user: UserId,
        /// The whole preferences.
        prefs: NotifyPrefs,
    },
    /// A user's preferences for a channel are now these.
    Channel {
        /// The user.
        user: UserId,
        /// The channel.
        channel: ChannelId,
        /// The whole channel preferences.
        prefs: ChannelPrefs,
    },
    /// A device was registered. A device of any user with the same `app_id` and `pushkey`
    /// is replaced: a push key reaches one device, and its latest registration owns it.
    DeviceAdded(PushDevice),
    /// A device was removed.
    DeviceRemoved {
        /// Its owner.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
}

impl From<NotifyChange> for MetaEvent {
    fn from(c: NotifyChange) -> MetaEvent {
        MetaEvent::Notify(Box::new(c))
    }
}

// ---------------------------------------------------------------------------------------
// Client input
// ---------------------------------------------------------------------------------------

/// A `PATCH` of `prefs`: each field present replaces that field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PrefsPatch {
    /// `all`, `mentions` or `none`.
    #[serde(default)]
    pub push: Option<String>,
    /// `all`, `mentions` or `none`.
    #[serde(default)]
    pub email: Option<String>,
    /// Seconds between digests.
    #[serde(default)]
    pub email_digest_s: Option<u64>,
    /// The whole new keyword list.
    #[serde(default)]
    pub keywords: Option<Vec<String>>,
    /// Absent: unchanged; `null`: no schedule; an object: this schedule.
    #[serde(default, deserialize_with = "present")]
    pub dnd_schedule: Option<Option<ScheduleInput>>,
}

/// Tells a field given as `null` (`Some(None)`) from an absent one (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A do-not-disturb schedule as a client writes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ScheduleInput {
    /// An IANA time zone name.
    pub tz: String,
    /// Day names (`mon` … `sun`) on which the window starts.
    pub days: Vec<String>,
    /// `HH:MM`, 24-hour.
    pub start: String,
    /// `HH:MM`, 24-hour.
    pub end: String,
}

/// The body of `PUT /channels/{cid}/notification-prefs`; an absent field takes its default
/// (`level` `default`, `muted` false), as a `PUT` replaces the whole value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ChannelPrefsInput {
    /// `default`, `all`, `mentions` or `none`.
    #[serde(default)]
    pub level: Option<String>,
    /// Whether the channel is muted.
    #[serde(default)]
    pub muted: Option<bool>,
}

/// The body of `POST /me/push-devices`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct DeviceInput {
    /// The push gateway's app ID.
    pub app_id: String,
    /// The device's push key.
    pub pushkey: String,
    /// `apns`, `fcm` or `webpush`.
    pub platform: String,
}

impl NotifyPrefs {
    /// These preferences with a patch applied, every changed field checked.
    pub fn patched(&self, patch: PrefsPatch) -> Result<NotifyPrefs, DomainError> {
        let mut next = self.clone();
        if let Some(push) = patch.push {
            next.push = Level::parse("push", &push)?;
        }
        if let Some(email) = patch.email {
            next.email = Level::parse("email", &email)?;
        }
        if let Some(s) = patch.email_digest_s {
            next.email_digest_s = u32::try_from(s)
                .ok()
                .filter(|s| *s <= EMAIL_DIGEST_S_MAX)
                .ok_or_else(|| {
                    DomainError::Invalid(format!(
                        "email_digest_s must be from 0 to {EMAIL_DIGEST_S_MAX} seconds"
                    ))
                })?;
        }
        if let Some(keywords) = patch.keywords {
            next.keywords = check_keywords(keywords)?;
        }
        if let Some(schedule) = patch.dnd_schedule {
            next.dnd_schedule = schedule.map(DndSchedule::parse).transpose()?;
        }
        Ok(next)
    }
}

/// Keywords are trimmed, non-empty, at most [`KEYWORD_CHARS_MAX`] characters without control
/// characters, at most [`KEYWORDS_MAX`] of them; a repeat (ignoring case) is dropped.
pub fn check_keywords(keywords: Vec<String>) -> Result<Vec<String>, DomainError> {
    if keywords.len() > KEYWORDS_MAX {
        return Err(DomainError::TooMany(format!(
            "at most {KEYWORDS_MAX} keywords, not {}",
            keywords.len()
        )));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(keywords.len());
    for k in keywords {
        let k = k.trim();
        let chars = k.chars().count();
        if chars == 0 || chars > KEYWORD_CHARS_MAX {
            return Err(DomainError::Invalid(format!(
                "a keyword is 1 to {KEYWORD_CHARS_MAX} characters"
            )));
        }
        if k.chars().any(char::is_control) {
            return Err(DomainError::Invalid(
                "a keyword may not contain control characters".into(),
            ));
        }
        if seen.insert(k.to_lowercase()) {
            out.push(k.to_owned());
        }
    }
    Ok(out)
}

/// `HH:MM`, 24-hour, two digits each, as minutes after midnight.
fn parse_hhmm(field: &str, s: &str) -> Result<u16, DomainError> {
    let bad = || {
        DomainError::Invalid(format!(
            "{field} must be a time \"HH:MM\" from 00:00 to 23:59"
        ))
    };
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let two = |p: &str| {
        (p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse::<u16>().ok())
            .flatten()
    };
    match (two(h), two(m)) {
        (Some(h), Some(m)) if h < 24 && m < 60 => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

/// `HH:MM` of minutes after midnight.
pub fn hhmm(min: u16) -> String {
    format!("{:02}:{:02}", min / 60, min % 60)
}

/// The time zone of an IANA name, from the database compiled into the binary.
pub fn time_zone(name: &str) -> Result<jiff::tz::TimeZone, DomainError> {
    jiff::tz::db().get(name).map_err(|_| {
        DomainError::Invalid(format!(
            "tz {name:?} is not an IANA time zone name, such as \"Europe/Paris\""
        ))
    })
}

impl DndSchedule {
    /// Checks a schedule as a client wrote it.
    pub fn parse(input: ScheduleInput) -> Result<DndSchedule, DomainError> {
        let zone = time_zone(&input.tz)?;
        if input.days.is_empty() {
            return Err(DomainError::Invalid(
                "days must name at least one day".into(),
            ));
        }
        let mut days = 0u8;
        for d in &input.days {
            let i = DAY_NAMES.iter().position(|n| n == d).ok_or_else(|| {
                DomainError::Invalid(format!(
                    "{d:?} is not a day: days are mon, tue, wed, thu, fri, sat, sun"
                ))
            })?;
            days |= 1 << i;
        }
        let start_min = parse_hhmm("start", &input.start)?;
        let end_min = parse_hhmm("end", &input.end)?;
        if start_min == end_min {
            return Err(DomainError::Invalid("start and end must differ".into()));
        }
        Ok(DndSchedule {
            tz: zone.iana_name().unwrap_or(&input.tz).to_owned(),
            days,
            start_min,
            end_min,
        })
    }

    /// Whether the window starts on day `i` of [`DAY_NAMES`] (Monday is 0).
    pub fn starts_on(&self, i: usize) -> bool {
        self.days & (1 << i) != 0
    }
}

impl ChannelPrefs {
    /// Checks the body of a channel preferences `PUT`.
    pub fn parse(input: ChannelPrefsInput) -> Result<ChannelPrefs, DomainError> {
        Ok(ChannelPrefs {
            level: input
                .level
                .as_deref()
                .map(ChannelLevel::parse)
                .transpose()?
                .unwrap_or(ChannelLevel::Default),
            muted: input.muted.unwrap_or(false),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The state
// ---------------------------------------------------------------------------------------

/// A notification preferences command, decided by the metadata owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyCommand {
    /// A user changes some of their preferences.
    PatchPrefs {
        /// The user.
        user: UserId,
        /// The changes.
        patch: PrefsPatch,
    },
    /// A user replaces their preferences for a channel of a workspace they are in.
    SetChannel {
        /// The user.
        user: UserId,
        /// The channel.
        channel: ChannelId,
        /// The new preferences.
        prefs: ChannelPrefsInput,
    },
    /// A user registers a push device.
    AddDevice {
        /// The user.
        user: UserId,
        /// The device.
        device: DeviceInput,
        /// The time, in microseconds since the Unix epoch.
        at_us: u64,
    },
    /// A user removes one of their push devices.
    RemoveDevice {
        /// The user.
        user: UserId,
        /// The device.
        device: DeviceId,
    },
}

impl NotifyCommand {
    /// The user the command is about.
    pub fn user(&self) -> UserId {
        match self {
            NotifyCommand::PatchPrefs { user, .. }
            | NotifyCommand::SetChannel { user, .. }
            | NotifyCommand::AddDevice { user, .. }
            | NotifyCommand::RemoveDevice { user, .. } => *user,
        }
    }
}

/// Every user's notification preferences and push devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotifyState {
    prefs: HashMap<UserId, NotifyPrefs>,
    channels: HashMap<(UserId, ChannelId), ChannelPrefs>,
    devices: HashMap<DeviceId, PushDevice>,
    by_user: HashMap<UserId, BTreeSet<DeviceId>>,
    by_key: HashMap<(String, String), DeviceId>,
}

impl NotifyState {
    /// A user's preferences (the defaults until they set some).
    pub fn prefs(&self, user: UserId) -> &NotifyPrefs {
        self.prefs.get(&user).unwrap_or(&DEFAULT_PREFS)
    }

    /// A user's preferences for a channel (the defaults until they set some).
    pub fn channel(&self, user: UserId, channel: ChannelId) -> ChannelPrefs {
        self.channels
            .get(&(user, channel))
            .copied()
            .unwrap_or_default()
    }

    /// The changes that rebuild this state from empty, applied in order: every user's
    /// preferences, every channel preference, every device in ID order (so each push key
    /// names one device at every step). For a consumer's snapshot of its own copy.
    pub fn changes(&self) -> Vec<NotifyChange> {
        let mut prefs: Vec<_> = self.prefs.iter().collect();
        prefs.sort_unstable_by_key(|(u, _)| **u);
        let mut channels: Vec<_> = self.channels.iter().collect();
        channels.sort_unstable_by_key(|(k, _)| **k);
        let mut devices: Vec<_> = self.devices.values().collect();
        devices.sort_unstable_by_key(|d| d.id);
        let prefs = prefs.into_iter().map(|(u, p)| NotifyChange::Prefs {
            user: *u,
            prefs: p.clone(),
        });
        let channels = channels
            .into_iter()
            .map(|((user, channel), p)| NotifyChange::Channel {
                user: *user,
                channel: *channel,
                prefs: *p,
            });
        let devices = devices
            .into_iter()
            .map(|d| NotifyChange::DeviceAdded(d.clone()));
        prefs.chain(channels).chain(devices).collect()
    }

    /// Whether a user has a push device.
    pub fn has_devices(&self, user: UserId) -> bool {
        self.by_user.contains_key(&user)
    }

    /// The users whose preferences or devices a change alters, each with the one channel
    /// it concerns (`None`: all of theirs), as the state stands before it is applied. A
    /// device takes its push key from any other user who had it.
    pub fn touched_by(&self, change: &NotifyChange) -> Vec<(UserId, Option<ChannelId>)> {
        match change {
            NotifyChange::Prefs { user, .. } | NotifyChange::DeviceRemoved { user, .. } => {
                vec![(*user, None)]
            }
            NotifyChange::Channel { user, channel, .. } => vec![(*user, Some(*channel))],
            NotifyChange::DeviceAdded(d) => {
                let key = (d.app_id.clone(), d.pushkey.clone());
                let before = (self.by_key.get(&key))
                    .and_then(|id| self.devices.get(id))
                    .map(|old| old.user)
                    .filter(|u| *u != d.user);
                std::iter::once(d.user)
                    .chain(before)
                    .map(|u| (u, None))
                    .collect()
            }
        }
    }

    /// A user's push devices, in ID order.
    pub fn devices(&self, user: UserId) -> Vec<&PushDevice> {
        self.by_user
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|d| self.devices.get(d))
            .collect()
    }

    /// Decides a command; `id` is the ID a new device gets. The caller has checked that
    /// the user exists (and, for a channel, that it is of a workspace they are in).
    pub fn decide(&self, cmd: NotifyCommand, id: u64) -> Result<NotifyChange, DomainError> {
        Ok(match cmd {
            NotifyCommand::PatchPrefs { user, patch } => NotifyChange::Prefs {
                user,
                prefs: self.prefs(user).patched(patch)?,
            },
            NotifyCommand::SetChannel {
                user,
                channel,
                prefs,
            } => NotifyChange::Channel {
                user,
                channel,
                prefs: ChannelPrefs::parse(prefs)?,
            },
            NotifyCommand::AddDevice {
                user,
                device,
                at_us,
            } => NotifyChange::DeviceAdded(self.new_device(user, device, id, at_us)?),
            NotifyCommand::RemoveDevice { user, device } => match self.devices.get(&device) {
                Some(d) if d.user == user => NotifyChange::DeviceRemoved { user, device },
                _ => return Err(DomainError::NotFound("device")),
            },
        })
    }

    /// A device to register: the user's own device with this key keeps its ID.
    fn new_device(
        &self,
        user: UserId,
        input: DeviceInput,
        id: u64,
        at_us: u64,
    ) -> Result<PushDevice, DomainError> {
        let platform = Platform::parse(&input.platform)?;
        let app_chars = input.app_id.chars().count();
        if app_chars == 0 || app_chars > APP_ID_CHARS_MAX {
            return Err(DomainError::Invalid(format!(
                "app_id is 1 to {APP_ID_CHARS_MAX} characters"
            )));
        }
        if input.pushkey.is_empty() || input.pushkey.len() > PUSHKEY_BYTES_MAX {
            return Err(DomainError::Invalid(format!(
                "pushkey is 1 to {PUSHKEY_BYTES_MAX} bytes"
            )));
        }
        let key = (input.app_id, input.pushkey);
        let mine = self
            .by_key
            .get(&key)
            .filter(|d| self.devices.get(d).is_some_and(|d| d.user == user))
            .copied();
        let count = self.by_user.get(&user).map_or(0, BTreeSet::len);
        if mine.is_none() && count >= DEVICES_PER_USER_MAX {
            return Err(DomainError::TooMany(format!(
                "at most {DEVICES_PER_USER_MAX} push devices per user"
            )));
        }
        Ok(PushDevice {
            id: mine.unwrap_or(DeviceId(id)),
            user,
            app_id: key.0,
            pushkey: key.1,
            platform,
            at_us,
        })
    }

    /// Applies a committed change.
    pub fn apply(&mut self, change: &NotifyChange) {
        match change {
            NotifyChange::Prefs { user, prefs } => {
                self.prefs.insert(*user, prefs.clone());
            }
            NotifyChange::Channel {
                user,
                channel,
                prefs,
            } => {
                self.channels.insert((*user, *channel), *prefs);
            }
            NotifyChange::DeviceAdded(d) => {
                let key = (d.app_id.clone(), d.pushkey.clone());
                if let Some(old) = self.by_key.get(&key).copied() {
                    self.remove_device(old);
                }
                self.by_key.insert(key, d.id);
                self.by_user.entry(d.user).or_default().insert(d.id);
                self.devices.insert(d.id, d.clone());
            }
            NotifyChange::DeviceRemoved { device, .. } => self.remove_device(*device),
        }
    }

    fn remove_device(&mut self, id: DeviceId) {
        let Some(d) = self.devices.remove(&id) else {
            return;
        };
        self.by_key.remove(&(d.app_id, d.pushkey));
        if let Some(set) = self.by_user.get_mut(&d.user) {
            set.remove(&id);
            if set.is_empty() {
                self.by_user.remove(&d.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(tz: &str, days: &[&str], start: &str, end: &str) -> ScheduleInput {
        ScheduleInput {
            tz: tz.into(),
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            end: end.into(),
        }
    }

    // A patch changes only the fields it names, and every field is checked: levels, the
    // digest interval, keyword counts and lengths, time zones, days and times.
    #[test]
    fn patches_are_checked_field_by_field() {
        let base = NotifyPrefs::default();
        assert_eq!(base.push, Level::Mentions);
        assert_eq!(base.email_digest_s, 900);
        let p = base
            .patched(PrefsPatch {
                push: Some("all".into()),
                keywords: Some(vec![" Deploy ".into(), "deploy".into(), "c++".into()]),
                dnd_schedule: Some(Some(schedule(
                    "europe/paris",
                    &["sun", "mon"],
                    "22:00",
                    "07:30",
                ))),
                ..PrefsPatch::default()
            })
            .unwrap();
        assert_eq!((p.push, p.email), (Level::All, Level::Mentions));
        assert_eq!(p.keywords, ["Deploy", "c++"]);
        let s = p.dnd_schedule.clone().unwrap();
        assert_eq!(s.tz, "Europe/Paris");
        assert_eq!(
            (s.days, s.start_min, s.end_min),
            (0b100_0001, 22 * 60, 7 * 60 + 30)
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json["dnd_schedule"],
            serde_json::json!({"tz": "Europe/Paris", "days": ["mon", "sun"], "start": "22:00", "end": "07:30"})
        );
        // null clears the schedule; absent keeps it.
        let kept = p.patched(PrefsPatch::default()).unwrap();
        assert_eq!(kept, p);
        let cleared = p
            .patched(PrefsPatch {
                dnd_schedule: Some(None),
                ..PrefsPatch::default()
            })
            .unwrap();
        assert_eq!(cleared.dnd_schedule, None);

        let bad = |patch: PrefsPatch| base.patched(patch).unwrap_err();
        let invalid = |patch: PrefsPatch| matches!(bad(patch), DomainError::Invalid(_));
        assert!(invalid(PrefsPatch {
            push: Some("loud".into()),
            ..PrefsPatch::default()
        }));
        assert!(invalid(PrefsPatch {
            email_digest_s: Some(u64::from(EMAIL_DIGEST_S_MAX) + 1),
            ..PrefsPatch::default()
        }));
        let many: Vec<String> = (0..=KEYWORDS_MAX).map(|i| format!("k{i}")).collect();
        assert!(matches!(
            bad(PrefsPatch {
                keywords: Some(many),
                ..PrefsPatch::default()
            }),
            DomainError::TooMany(_)
        ));
        for k in ["", "  ", &"x".repeat(KEYWORD_CHARS_MAX + 1), "a\nb"] {
            assert!(check_keywords(vec![k.to_owned()]).is_err(), "{k:?}");
        }
        assert!(check_keywords(vec!["é".repeat(KEYWORD_CHARS_MAX)]).is_ok());
        for (tz, days, start, end) in [
            ("Mars/Olympus", &["mon"][..], "22:00", "07:00"),
            ("+02:00", &["mon"], "22:00", "07:00"),
            ("Europe/Paris", &[], "22:00", "07:00"),
            ("Europe/Paris", &["monday"], "22:00", "07:00"),
            ("Europe/Paris", &["mon"], "24:00", "07:00"),
            ("Europe/Paris", &["mon"], "7:00", "08:00"),
            ("Europe/Paris", &["mon"], "07:60", "08:00"),
            ("Europe/Paris", &["mon"], "07:00", "07:00"),
            ("Europe/Paris", &["mon"], "0700", "08:00"),
        ] {
            assert!(
                DndSchedule::parse(schedule(tz, days, start, end)).is_err(),
                "{tz} {days:?} {start} {end}"
            );
        }
    }

    // Channel levels and platforms parse only their API names; a PUT's absent fields take
    // the defaults.
    #[test]
    fn channel_prefs_and_platforms() {
        let p = ChannelPrefs::parse(ChannelPrefsInput {
            level: Some("none".into()),
            muted: None,
        })
        .unwrap();
        assert_eq!(p.level, ChannelLevel::Is(Level::None));
        assert!(!p.muted);
        assert_eq!(
            ChannelPrefs::parse(ChannelPrefsInput::default()).unwrap(),
            ChannelPrefs::default()
        );
        assert!(ChannelPrefs::parse(ChannelPrefsInput {
            level: Some("loud".into()),
            muted: None,
        })
        .is_err());
        assert!(Platform::parse("gcm").is_err());
        assert_eq!(Platform::parse("webpush").unwrap(), Platform::Webpush);
    }

    // Devices: a user's re-registration keeps its ID; a key registered by another user moves
    // to them; only the owner removes a device; the per-user limit holds.
    #[test]
    fn devices_move_with_their_key() {
        let mut s = NotifyState::default();
        let (a, b) = (UserId(1), UserId(2));
        let input = |key: &str| DeviceInput {
            app_id: "io.chorus".into(),
            pushkey: key.into(),
            platform: "fcm".into(),
        };
        let add = |s: &mut NotifyState, user, key: &str, id| {
            let cmd = NotifyCommand::AddDevice {
                user,
                device: input(key),
                at_us: 1,
            };
            let change = s.decide(cmd, id)?;
            s.apply(&change);
            match change {
                NotifyChange::DeviceAdded(d) => Ok(d.id),
                other => panic!("{other:?}"),
            }
        };
        let d1 = add(&mut s, a, "k1", 10).unwrap();
        assert_eq!(add(&mut s, a, "k1", 11).unwrap(), d1);
        assert!(s.has_devices(a) && !s.has_devices(b));
        // Taking another user's key touches both users.
        let cmd = NotifyCommand::AddDevice {
            user: b,
            device: input("k1"),
            at_us: 1,
        };
        let change = s.decide(cmd, 12).unwrap();
        assert_eq!(s.touched_by(&change), vec![(b, None), (a, None)]);
        let d2 = add(&mut s, b, "k1", 12).unwrap();
        assert_eq!(d2, DeviceId(12));
        // The changes it lists rebuild the state.
        s.apply(&NotifyChange::Prefs {
            user: a,
            prefs: NotifyPrefs {
                keywords: vec!["deploy".into()],
                ..Default::default()
            },
        });
        s.apply(&NotifyChange::Channel {
            user: b,
            channel: ChannelId(9),
            prefs: ChannelPrefs {
                muted: true,
                ..Default::default()
            },
        });
        let mut rebuilt = NotifyState::default();
        for c in s.changes() {
            rebuilt.apply(&c);
        }
        assert_eq!(rebuilt, s);
        assert!(s.devices(a).is_empty() && !s.has_devices(a));
        assert_eq!(s.devices(b).len(), 1);
        let remove = |user, device| NotifyCommand::RemoveDevice { user, device };
        assert_eq!(
            s.decide(remove(a, d2), 0),
            Err(DomainError::NotFound("device"))
        );
        let change = s.decide(remove(b, d2), 0).unwrap();
        s.apply(&change);
        assert!(s.devices(b).is_empty());
        for i in 0..DEVICES_PER_USER_MAX as u64 {
            add(&mut s, a, &format!("n{i}"), 100 + i).unwrap();
        }
        assert!(matches!(
            add(&mut s, a, "one-more", 200),
            Err(DomainError::TooMany(_))
        ));
        assert!(
            add(&mut s, a, "n0", 201).is_ok(),
            "re-registering is not a new device"
        );
        let bad = NotifyCommand::AddDevice {
            user: b,
            device: DeviceInput {
                platform: "gcm".into(),
                ..input("x")
            },
            at_us: 1,
        };
        assert!(s.decide(bad, 300).is_err());
    }
}
