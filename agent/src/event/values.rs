//! The typed values records carry, each with the one text form it has in the JSON contract and
//! on the terminal. Unknown numbers are kept (`Other(n)`), never mapped to a known name.

use std::{
    fmt,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::CtEvent;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Interned text (reason names, symbols, interface and node names): cloning costs a counter.
pub type Name = Arc<str>;

/// Implements `Display`/`FromStr`-based serde for a value type.
macro_rules! serde_via_str {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse()
                    .map_err(|()| de::Error::custom(format!("`{s}` is not {}", $what)))
            }
        }
    };
}

/// Maps keyed by numbers (reason codes, namespace inodes), whose JSON keys are strings. Serde
/// reads such keys back only outside a tagged enum's buffering, so they are parsed here.
pub mod number_keys {
    use std::{collections::BTreeMap, fmt::Display, str::FromStr};

    use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Display, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k.to_string(), v)))
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: FromStr + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        BTreeMap::<String, V>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                let n = k
                    .parse()
                    .map_err(|_| de::Error::custom(format!("`{k}` is not a number")))?;
                Ok((n, v))
            })
            .collect()
    }
}

/// A wall-clock instant, as time since the Unix epoch; written as RFC 3339 with nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(Duration);

/// The last second RFC 3339 can write (end of year 9999).
const LAST_SECOND: u64 = 253_402_300_799;

impl Time {
    pub fn from_system(t: SystemTime) -> Self {
        Self(t.duration_since(UNIX_EPOCH).unwrap_or_default())
    }

    /// From seconds since the epoch (clamped to what RFC 3339 can write).
    pub fn from_secs_f64(t: f64) -> Self {
        Self(Duration::from_secs_f64(t.clamp(0.0, LAST_SECOND as f64)))
    }

    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0.as_secs_f64()
    }

    pub fn unix_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// How long after `earlier` this is (zero when it is not after it).
    pub fn since(self, earlier: Self) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// This time plus `d`, saturating at the end of time.
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.checked_add(d).unwrap_or(Duration::MAX))
    }

    /// `HH:MM:SS.micro` of the RFC 3339 form: what a terminal line shows.
    pub fn clock_micros(self) -> String {
        let t = self.to_string();
        t.get(11..26).unwrap_or(&t).to_owned()
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = if self.0.as_secs() > LAST_SECOND {
            Duration::from_secs(LAST_SECOND)
        } else {
            self.0
        };
        write!(f, "{}", humantime::format_rfc3339_nanos(UNIX_EPOCH + d))
    }
}

impl FromStr for Time {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let t = humantime::parse_rfc3339(s).map_err(|_| ())?;
        t.duration_since(UNIX_EPOCH).map(Self).map_err(|_| ())
    }
}
serde_via_str!(Time, "an RFC 3339 time");

/// A link-layer (MAC) address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    pub fn is_broadcast(&self) -> bool {
        self.0 == [0xff; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or(())?;
            if p.len() != 2 {
                return Err(());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        match parts.next() {
            None => Ok(Self(out)),
            Some(_) => Err(()),
        }
    }
}
serde_via_str!(Mac, "a MAC address");

/// Transport protocol; unknown numbers are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
    Other(u8),
}

impl From<u8> for L4Proto {
    fn from(v: u8) -> Self {
        match v {
            6 => Self::Tcp,
            17 => Self::Udp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            132 => Self::Sctp,
            other => Self::Other(other),
        }
    }
}

impl L4Proto {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
            Self::Icmpv6 => 58,
            Self::Sctp => 132,
            Self::Other(n) => n,
        }
    }

    /// Parses `tcp`, `udp`, `icmp`, `icmpv6`, `sctp` or a protocol number (what `--proto`
    /// takes).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "icmp" => Some(Self::Icmp),
            "icmpv6" | "ipv6-icmp" => Some(Self::Icmpv6),
            "sctp" => Some(Self::Sctp),
            other => other.parse::<u8>().ok().map(Self::from),
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }
}

impl fmt::Display for L4Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Udp => f.write_str("udp"),
            Self::Icmp => f.write_str("icmp"),
            Self::Icmpv6 => f.write_str("icmpv6"),
            Self::Sctp => f.write_str("sctp"),
            Self::Other(n) => write!(f, "proto-{n}"),
        }
    }
}

impl FromStr for L4Proto {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.strip_prefix("proto-") {
            Some(n) => n.parse::<u8>().map(Self::from).map_err(|_| ()),
            None => Self::parse(s).ok_or(()),
        }
    }
}
serde_via_str!(L4Proto, "a transport protocol");

/// ARP operation or NDP message; unknown values are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ArpOp {
    #[default]
    Request,
    Reply,
    /// IPv6 neighbour solicitation.
    Solicitation,
    /// IPv6 neighbour advertisement.
    Advertisement,
    Other(u16),
}

impl fmt::Display for ArpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Request => f.write_str("request"),
            Self::Reply => f.write_str("reply"),
            Self::Solicitation => f.write_str("neighbor-solicitation"),
            Self::Advertisement => f.write_str("neighbor-advertisement"),
            Self::Other(n) => write!(f, "op-{n}"),
        }
    }
}

impl FromStr for ArpOp {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "request" => Self::Request,
            "reply" => Self::Reply,
            "neighbor-solicitation" => Self::Solicitation,
            "neighbor-advertisement" => Self::Advertisement,
            other => Self::Other(
                other
                    .strip_prefix("op-")
                    .and_then(|n| n.parse().ok())
                    .ok_or(())?,
            ),
        })
    }
}
serde_via_str!(ArpOp, "an ARP/NDP operation");

/// TCP flags, written in tcpdump's letters (`S`, `SA`, `FA`, `R`, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags(pub u8);

const TCP_LETTERS: [(u8, char); 8] = [
    (0x02, 'S'),
    (0x01, 'F'),
    (0x04, 'R'),
    (0x08, 'P'),
    (0x10, 'A'),
    (0x20, 'U'),
    (0x40, 'E'),
    (0x80, 'C'),
];

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str(".");
        }
        for (bit, c) in TCP_LETTERS {
            if self.0 & bit != 0 {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for TcpFlags {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if s == "." {
            return Ok(Self(0));
        }
        s.chars().try_fold(Self(0), |acc, c| {
            let (bit, _) = TCP_LETTERS.iter().find(|(_, l)| *l == c).ok_or(())?;
            Ok(Self(acc.0 | bit))
        })
    }
}
serde_via_str!(TcpFlags, "TCP flags");

/// `NUD_*` neighbour states (a stable UAPI), written as `STALE` or `REACHABLE|PROBE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NudState(pub u8);

const NUD_NAMES: [(u8, &str); 8] = [
    (0x01, "INCOMPLETE"),
    (0x02, "REACHABLE"),
    (0x04, "STALE"),
    (0x08, "DELAY"),
    (0x10, "PROBE"),
    (0x20, "FAILED"),
    (0x40, "NOARP"),
    (0x80, "PERMANENT"),
];

impl fmt::Display for NudState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("NONE");
        }
        let mut first = true;
        for (bit, name) in NUD_NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl FromStr for NudState {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if s == "NONE" {
            return Ok(Self(0));
        }
        s.split('|').try_fold(Self(0), |acc, part| {
            let (bit, _) = NUD_NAMES.iter().find(|(_, n)| *n == part).ok_or(())?;
            Ok(Self(acc.0 | bit))
        })
    }
}
serde_via_str!(NudState, "a neighbour state");

/// What conntrack did to a dropped packet; unknown event numbers are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConntrackEvent(pub Result<CtEvent, u8>);

impl ConntrackEvent {
    pub fn known(self) -> Option<CtEvent> {
        self.0.ok()
    }
}

impl fmt::Display for ConntrackEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Ok(e) => f.write_str(e.as_str()),
            Err(n) => write!(f, "unknown-{n}"),
        }
    }
}

impl FromStr for ConntrackEvent {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if let Some(e) = CtEvent::from_name(s) {
            return Ok(Self(Ok(e)));
        }
        let n = s.strip_prefix("unknown-").ok_or(())?;
        n.parse().map(|n| Self(Err(n))).map_err(|_| ())
    }
}
serde_via_str!(ConntrackEvent, "a conntrack event");

/// IP version of a packet or announcement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(ip: std::net::IpAddr) -> Self {
        if ip.is_ipv6() {
            Self::Ipv6
        } else {
            Self::Ipv4
        }
    }
}

/// Whether a host sent or received a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Tx,
    #[default]
    Rx,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tx => "tx",
            Self::Rx => "rx",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: fmt::Display + FromStr<Err = ()> + PartialEq + fmt::Debug>(v: T) {
        assert_eq!(v.to_string().parse::<T>(), Ok(v));
    }

    #[test]
    fn text_forms_read_back() {
        assert_eq!(TcpFlags(0x02).to_string(), "S");
        assert_eq!(TcpFlags(0x12).to_string(), "SA");
        assert_eq!(TcpFlags(0x14).to_string(), "RA");
        assert_eq!(TcpFlags(0).to_string(), ".");
        assert_eq!(NudState(0x04).to_string(), "STALE");
        assert_eq!(NudState(0).to_string(), "NONE");
        for v in [0, 0x12, 0xff] {
            round_trip(TcpFlags(v));
            round_trip(NudState(v));
        }
        round_trip(L4Proto::Other(253));
        round_trip(ArpOp::Other(9));
        round_trip(ConntrackEvent(Err(9)));
        round_trip(ConntrackEvent(Ok(CtEvent::TableFull)));
        round_trip(Mac([2, 0, 0, 0, 0, 0xb]));
        assert!("02:00:00:00:00".parse::<Mac>().is_err());
        let t: Time = "9999-12-31T23:59:59.999999999Z".parse().unwrap();
        round_trip(t);
        assert_eq!(
            Time::from_secs_f64(1e300).to_string(),
            "9999-12-31T23:59:59.000000000Z"
        );
        assert!("not a time".parse::<Time>().is_err());
    }
}
