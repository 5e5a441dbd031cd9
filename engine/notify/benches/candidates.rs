//! The decider's candidates of one message in a 100,000-member channel (issue 16): kept
//! per channel (`chorus_notify::candidates`) against a walk of every member with the
//! lookups the decider made per member before they were kept (channel preferences, user
//! preferences, devices), in the same run.
//!
//! The channel: 100,000 members with default preferences (push level `mentions`) and a
//! push device each; 1,000 of them (one in a hundred) with a keyword, 100 with push level
//! `all`, 100 who muted it. Messages: plain (no mention, no keyword), one naming three
//! members, one holding a keyword, and `@channel`.
//!
//! `cargo bench -p chorus-notify --bench candidates`.

use chorus_engine::domain::event::Mentions;
use chorus_engine::domain::notify::rules;
use chorus_engine::domain::notify::{
    ChannelPrefs, Level, NotifyChange, NotifyPrefs, NotifyState, Platform, PushDevice,
};
use chorus_engine::ids::{ChannelId, DeviceId, UserId};
use chorus_notify::candidates::{self, Candidates, Posted};
use chorus_notify::decider::Modes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

const MEMBERS: u64 = 100_000;
const CHANNEL: ChannelId = ChannelId(7);

struct Setup {
    notify: NotifyState,
    members: Vec<UserId>,
    kept: Candidates,
}

fn setup() -> Setup {
    let mut notify = NotifyState::default();
    let members: Vec<UserId> = (1..=MEMBERS).map(UserId).collect();
    for u in &members {
        notify.apply(&NotifyChange::DeviceAdded(PushDevice {
            id: DeviceId(u.0),
            user: *u,
            app_id: "chat.bench".into(),
            pushkey: format!("key-{}", u.0),
            platform: Platform::Fcm,
            at_us: 0,
        }));
        let prefs = match u.0 % 1000 {
            0 => Some(NotifyPrefs {
                push: Level::All,
                ..Default::default()
            }),
            n if n % 100 == 1 => Some(NotifyPrefs {
                keywords: vec!["deploy".into()],
                ..Default::default()
            }),
            _ => None,
        };
        if let Some(prefs) = prefs {
            notify.apply(&NotifyChange::Prefs { user: *u, prefs });
        }
        if u.0 % 1000 == 500 {
            notify.apply(&NotifyChange::Channel {
                user: *u,
                channel: CHANNEL,
                prefs: ChannelPrefs {
                    muted: true,
                    ..Default::default()
                },
            });
        }
    }
    let mut kept = Candidates::default();
    let pushes = Modes {
        push: true,
        email: false,
    };
    for u in &members {
        let (standing, keywords) = candidates::standing(&notify, pushes, *u, CHANNEL);
        kept.joined(CHANNEL, *u, standing, keywords);
    }
    Setup {
        notify,
        members,
        kept,
    }
}

/// The candidates as the decider found them before: every member walked, with its
/// preferences, channel preferences and devices looked up.
fn walk(s: &Setup, m: &Posted<'_>, text: &str) -> Vec<UserId> {
    (s.members.iter().copied())
        .filter(|u| *u != m.author && !s.notify.channel(*u, CHANNEL).muted)
        .filter(|u| {
            let prefs = s.notify.prefs(*u);
            let through = match rules::level(s.notify.channel(*u, CHANNEL), prefs.push) {
                Level::All => true,
                Level::None => false,
                Level::Mentions => {
                    m.direct
                        || rules::mentioned(*u, m.mentions, true)
                        || rules::keyword_in(&prefs.keywords, text)
                }
            };
            through && !s.notify.devices(*u).is_empty()
        })
        .collect()
}

fn kept(s: &Setup, m: &Posted<'_>, text: &str) -> Vec<UserId> {
    let text = text.to_lowercase();
    let has_keyword = |u| rules::keyword_in_lowercase(&s.notify.prefs(u).keywords, &text);
    s.kept.of(CHANNEL, m, has_keyword)
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let author = UserId(2);
    let none = Mentions::default();
    let named = Mentions {
        users: vec![UserId(3), UserId(40_000), UserId(99_999)],
        ..Default::default()
    };
    let everyone = Mentions {
        channel: true,
        ..Default::default()
    };
    let cases = [
        ("plain", &none, "lunch at noon?"),
        ("names_three", &named, "have a look"),
        ("keyword", &none, "the deploy is done"),
        ("at_channel", &everyone, "@channel hello"),
    ];
    let mut group = c.benchmark_group("candidates_100k");
    group.sample_size(20);
    for (name, mentions, text) in cases {
        let m = Posted {
            author,
            mentions,
            direct: false,
        };
        assert_eq!(kept(&s, &m, text), walk(&s, &m, text), "{name}");
        group.bench_function(format!("{name}/kept"), |b| {
            b.iter(|| black_box(kept(&s, &m, text)))
        });
        group.bench_function(format!("{name}/walk"), |b| {
            b.iter(|| black_box(walk(&s, &m, text)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
