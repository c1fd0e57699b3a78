//! The watchdog's input and output: one ASCII line per message, fields
//! separated by one space. Times are nanoseconds of `CLOCK_MONOTONIC`,
//! which every process of the machine shares.
//!
//! Worker to watchdog:
//! - `A <until>`: the advert is confirmed until then.
//! - `W <id> <pgid> <until> <grace> [<cgroup dir>]`: watch task `id`, the
//!   process group `pgid` (and the cgroup, if any), its lease confirmed
//!   until `until`, to be asked to stop `grace` before its deadline.
//! - `L <id> <until>`: task `id`'s lease is confirmed until then.
//! - `F <id>`: forget task `id`, which has ended (its group leader not yet
//!   reaped); the watchdog answers.
//!
//! Watchdog to worker: `F <id> <0|1>`: forgotten, and whether the watchdog
//! had signalled it.
//!
//! Decoding never panics: a line that is not one of these is an error the
//! watchdog logs and skips.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The longest line read; anything longer is garbage (a cgroup path is
/// well under it).
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Advert {
        until: u64,
    },
    Watch {
        id: u64,
        pgid: i32,
        until: u64,
        grace: u64,
        cgroup: Option<PathBuf>,
    },
    Lease {
        id: u64,
        until: u64,
    },
    Forget {
        id: u64,
    },
}

/// Why a line is not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadLine {
    #[error("unknown message kind {0:?}")]
    Kind(String),
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("field {0} is not a number: {1:?}")]
    Number(&'static str, String),
    #[error("the process group {0} is not one the watchdog may signal")]
    Group(i32),
    #[error("extra fields after the message")]
    Extra,
}

fn field<'a>(
    fields: &mut impl Iterator<Item = &'a [u8]>,
    name: &'static str,
) -> Result<&'a [u8], BadLine> {
    // Two spaces in a row leave an empty field: missing too.
    fields
        .next()
        .filter(|f| !f.is_empty())
        .ok_or(BadLine::Missing(name))
}

fn number<'a, T: std::str::FromStr>(
    fields: &mut impl Iterator<Item = &'a [u8]>,
    name: &'static str,
) -> Result<T, BadLine> {
    let f = field(fields, name)?;
    std::str::from_utf8(f)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BadLine::Number(name, String::from_utf8_lossy(f).into_owned()))
}

/// One line, without its newline.
pub fn decode(line: &[u8]) -> Result<Msg, BadLine> {
    let (kind, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    let mut f = rest.split(|&b| b == b' ');
    let msg = match kind {
        b"A" => Msg::Advert {
            until: number(&mut f, "until")?,
        },
        b"L" => Msg::Lease {
            id: number(&mut f, "id")?,
            until: number(&mut f, "until")?,
        },
        b"F" => Msg::Forget {
            id: number(&mut f, "id")?,
        },
        b"W" => {
            let id = number(&mut f, "id")?;
            let pgid: i32 = number(&mut f, "pgid")?;
            // 0, 1 and negative ids would signal the watchdog's own group,
            // init, or everything.
            if pgid <= 1 {
                return Err(BadLine::Group(pgid));
            }
            let until = number(&mut f, "until")?;
            let grace = number(&mut f, "grace")?;
            // The rest, spaces and all, is the cgroup's directory.
            let rest: Vec<&[u8]> = f.collect();
            let cgroup =
                (!rest.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(&rest.join(&b' '))));
            return Ok(Msg::Watch {
                id,
                pgid,
                until,
                grace,
                cgroup,
            });
        }
        other => return Err(BadLine::Kind(String::from_utf8_lossy(other).into_owned())),
    };
    match f.next() {
        None => Ok(msg),
        Some(_) => Err(BadLine::Extra),
    }
}

/// `msg` as a line, newline included; `None` for a cgroup path that
/// cannot be one line.
pub fn encode(msg: &Msg) -> Option<Vec<u8>> {
    let mut line = match msg {
        Msg::Advert { until } => format!("A {until}").into_bytes(),
        Msg::Lease { id, until } => format!("L {id} {until}").into_bytes(),
        Msg::Forget { id } => format!("F {id}").into_bytes(),
        Msg::Watch {
            id,
            pgid,
            until,
            grace,
            cgroup,
        } => {
            let mut l = format!("W {id} {pgid} {until} {grace}").into_bytes();
            if let Some(c) = cgroup {
                let c = c.as_os_str().as_bytes();
                if c.is_empty() || c.contains(&b'\n') {
                    return None;
                }
                l.push(b' ');
                l.extend_from_slice(c);
            }
            l
        }
    };
    line.push(b'\n');
    (line.len() <= MAX_LINE).then_some(line)
}

/// The watchdog's answer to `F <id>`: `(id, signalled)`, or `None` for
/// anything else.
pub fn decode_forgotten(line: &[u8]) -> Option<(u64, bool)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut f = text.split(' ');
    (f.next()? == "F").then_some(())?;
    let id = f.next()?.parse().ok()?;
    let signalled = match f.next()? {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    f.next().is_none().then_some((id, signalled))
}

/// The answer to `F <id>`, newline included.
pub fn encode_forgotten(id: u64, signalled: bool) -> Vec<u8> {
    format!("F {id} {}\n", u8::from(signalled)).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_message_goes_there_and_back() {
        let msgs = [
            Msg::Advert { until: 12 },
            Msg::Lease { id: 3, until: 99 },
            Msg::Forget { id: u64::MAX },
            Msg::Watch {
                id: 1,
                pgid: 4242,
                until: 5,
                grace: 6,
                cgroup: None,
            },
            Msg::Watch {
                id: 1,
                pgid: 4242,
                until: 5,
                grace: 6,
                cgroup: Some(PathBuf::from("/sys/fs/cgroup/a b/t1")),
            },
        ];
        for m in msgs {
            let line = encode(&m).unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(decode(&line[..line.len() - 1]), Ok(m));
        }
        let f = encode_forgotten(7, true);
        assert_eq!(decode_forgotten(&f[..f.len() - 1]), Some((7, true)));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert_eq!(decode(b""), Err(BadLine::Kind(String::new())));
        assert_eq!(decode(b"X 1"), Err(BadLine::Kind("X".into())));
        assert_eq!(decode(b"A"), Err(BadLine::Missing("until")));
        assert_eq!(
            decode(b"L 1 -3"),
            Err(BadLine::Number("until", "-3".into()))
        );
        assert_eq!(decode(b"F 1 2"), Err(BadLine::Extra));
        assert_eq!(decode(b"W 1 0 5 6"), Err(BadLine::Group(0)));
        assert_eq!(decode(b"W 1 -1 5 6"), Err(BadLine::Group(-1)));
        assert_eq!(decode(b"W 1 1 5 6"), Err(BadLine::Group(1)));
        assert_eq!(
            decode(b"W 1 99999999999 5 6"),
            Err(BadLine::Number("pgid", "99999999999".into()))
        );
        assert_eq!(decode_forgotten(b"F 1 2"), None);
        assert_eq!(decode_forgotten(b"F x 1"), None);
        let newline = Msg::Watch {
            id: 1,
            pgid: 2,
            until: 3,
            grace: 4,
            cgroup: Some(PathBuf::from("/a\nF 1")),
        };
        assert_eq!(encode(&newline), None, "a path that would be two lines");
    }

    proptest! {
        #[test]
        fn no_bytes_make_decoding_panic(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&line);
            let _ = decode_forgotten(&line);
        }

        #[test]
        fn no_printable_line_makes_decoding_panic(line in "[AWLF0-9 -]{0,60}") {
            let _ = decode(line.as_bytes());
        }
    }
}
