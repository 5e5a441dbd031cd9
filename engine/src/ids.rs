//! Identifiers of users, workspaces, channels and messages, and their opaque string forms.
//!
//! Inside the engine an ID is a number; outside it is an opaque string: a one-letter kind
//! (`U`, `W`, `C`, `M`, `F`, `D`) and the number in lowercase Crockford base32. A message has no
//! number of its own: it is named by its channel and the `seq` of the event that created
//! it, so message IDs need no allocator and replay to the same values.

use std::fmt;
use std::str::FromStr;

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// An ID's string form, written on the stack: at most a kind letter, two numbers of 13
/// digits and a dash. Serializing from it writes the string once; `serde_json`'s
/// `collect_str` escaped each piece a `Display` wrote on its own, a tenth of a history
/// page's rendering.
struct IdText {
    buf: [u8; 28],
    len: usize,
}

impl IdText {
    fn new(kind: char) -> IdText {
        let mut t = IdText {
            buf: [0; 28],
            len: 1,
        };
        t.buf[0] = u8::try_from(kind).expect("an ID's kind is an ASCII letter");
        t
    }

    fn push_byte(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// Appends `n` in base32.
    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 13];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = ALPHABET[(n % 32) as usize];
            n /= 32;
            if n == 0 {
                break;
            }
        }
        let n = digits.len() - i;
        self.buf[self.len..self.len + n].copy_from_slice(&digits[i..]);
        self.len += n;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("ascii")
    }
}

fn decode(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 13 {
        return None;
    }
    let mut n: u64 = 0;
    for b in s.bytes() {
        let d = ALPHABET.iter().position(|&a| a == b)? as u64;
        n = n.checked_mul(32)?.checked_add(d)?;
    }
    Some(n)
}

/// Why a string is not an ID of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind} id")]
pub struct IdError {
    /// The kind that was expected.
    pub kind: &'static str,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
#[rkyv(attr(allow(missing_docs)))]
        pub struct $name(pub u64);

        impl $name {
            fn text(self) -> IdText {
                let mut t = IdText::new($prefix);
                t.push_number(self.0);
                t
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.text().as_str())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                s.strip_prefix($prefix)
                    .and_then(decode)
                    .map($name)
                    .ok_or(IdError { kind: $kind })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.text().as_str())
            }
        }
    };
}

id_type!(
    /// A user account; users exist across workspaces.
    UserId, 'U', "user"
);
id_type!(
    /// A workspace: the unit of isolation.
    WorkspaceId, 'W', "workspace"
);
id_type!(
    /// A channel of any kind (public, private, DM, group DM).
    ChannelId, 'C', "channel"
);
id_type!(
    /// An uploaded file; numbered from the same sequence as users, workspaces and channels.
    FileId, 'F', "file"
);
id_type!(
    /// A push device a user registered (`API.md` §13); numbered from the same sequence.
    DeviceId, 'D', "device"
);

/// A message: its channel and the `seq` of the event that created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The channel the message lives in.
    pub channel: ChannelId,
    /// The seq of the `message:new` event that created it.
    pub seq: u64,
}

impl MessageId {
    fn text(self) -> IdText {
        let mut t = IdText::new('M');
        t.push_number(self.channel.0);
        t.push_byte(b'-');
        t.push_number(self.seq);
        t
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

impl FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<MessageId, IdError> {
        let err = IdError { kind: "message" };
        let (c, q) = s
            .strip_prefix('M')
            .ok_or(err.clone())?
            .split_once('-')
            .ok_or(err.clone())?;
        match (decode(c), decode(q)) {
            (Some(c), Some(q)) if q > 0 => Ok(MessageId {
                channel: ChannelId(c),
                seq: q,
            }),
            _ => Err(err),
        }
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.text().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The strings themselves are the API's: pinned, so a change to how they are written
    // (from a buffer on the stack) cannot change them.
    #[test]
    fn strings_are_kind_and_base32() {
        assert_eq!(UserId(0).to_string(), "U0");
        assert_eq!(ChannelId(33).to_string(), "C11");
        assert_eq!(WorkspaceId(u64::MAX).to_string(), "Wfzzzzzzzzzzzz");
        let m = MessageId {
            channel: ChannelId(31),
            seq: 32 * 32,
        };
        assert_eq!(m.to_string(), "Mz-100");
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"Mz-100\"");
        assert_eq!(serde_json::to_string(&FileId(10)).unwrap(), "\"Fa\"");
        let longest = MessageId {
            channel: ChannelId(u64::MAX),
            seq: u64::MAX,
        };
        assert_eq!(longest.to_string(), "Mfzzzzzzzzzzzz-fzzzzzzzzzzzz");
    }

    // IDs round-trip through their strings, and a string of another kind is refused.
    #[test]
    fn round_trip_and_kinds() {
        for n in [0u64, 1, 31, 32, 12345, u64::MAX] {
            let u = UserId(n);
            assert_eq!(u.to_string().parse::<UserId>(), Ok(u));
            assert!(u.to_string().parse::<ChannelId>().is_err());
        }
        let m = MessageId {
            channel: ChannelId(99),
            seq: 7,
        };
        assert_eq!(m.to_string().parse::<MessageId>(), Ok(m));
        for bad in [
            "",
            "U",
            "Uoops",
            "M1",
            "M1-",
            "M-1",
            "M1-0",
            "W",
            "Uzzzzzzzzzzzzzz",
        ] {
            assert!(bad.parse::<UserId>().is_err(), "{bad}");
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }
}
