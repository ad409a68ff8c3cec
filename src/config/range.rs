//! Config numbers whose range is part of their type.
//!
//! `Bounded<usize, 1, 64>` reads "a usize from 1 to 64", and
//! `Real<f64, UpToAnHour>` "more than 0 and at most 3600": the range is
//! stated where the key is declared, and [`Config::check`] reads it from
//! the type, so a key cannot be added without one.
//!
//! A value outside its range still deserializes. serde stops at the first
//! error it meets, and an operator should learn of every key outside its
//! range from one `check-config`, not one per edit
//! (`config::tests::every_problem_is_reported_at_once`). So until the check
//! these types hold whatever number the file gave; [`Config::parse`], the
//! one way from text to a config, runs the check before it hands one out,
//! and so does every reload.
//!
//! [`Config::check`]: super::Config::check
//! [`Config::parse`]: super::Config::parse

use std::marker::PhantomData;

use serde::Deserialize;

/// An unsigned integer key from `LO` to `HI`, both included.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(transparent)]
pub struct Bounded<T, const LO: u64, const HI: u64>(T);

impl<T: Unsigned, const LO: u64, const HI: u64> Bounded<T, LO, HI> {
    /// `value`, where it is within the range.
    pub fn new(value: T) -> Option<Self> {
        let bounded = Bounded(value);
        bounded.problem().is_none().then_some(bounded)
    }

    /// A default, or a test's value: [`Config::check`](super::Config::check)
    /// still judges it, and `config::tests` checks every default.
    pub(crate) const fn unchecked(value: T) -> Self {
        Bounded(value)
    }

    /// The value: within the range in every checked config.
    pub fn get(self) -> T {
        self.0
    }
}

impl<T: Unsigned, const LO: u64, const HI: u64> Ranged for Bounded<T, LO, HI> {
    fn problem(self) -> Option<String> {
        let within = (u128::from(LO)..=u128::from(HI)).contains(&self.0.wide());
        (!within).then(|| format!("must be within {LO}..={HI}, got {}", self.0))
    }
}

/// A command-line flag: the number, and then its range, checked.
impl<T: Unsigned + std::str::FromStr, const LO: u64, const HI: u64> std::str::FromStr
    for Bounded<T, LO, HI>
{
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let value = s
            .parse::<T>()
            .map_err(|_| format!("must be a whole number within {LO}..={HI}, got {s:?}"))?;
        let bounded = Bounded(value);
        match bounded.problem() {
            None => Ok(bounded),
            Some(problem) => Err(problem),
        }
    }
}

/// A value that knows its range.
pub trait Ranged: Copy {
    /// Why the value is outside its range, if it is.
    fn problem(self) -> Option<String>;
}

/// An optional key: unset is in range.
impl<T: Ranged> Ranged for Option<T> {
    fn problem(self) -> Option<String> {
        self.and_then(Ranged::problem)
    }
}

impl<T: std::fmt::Debug, const LO: u64, const HI: u64> std::fmt::Debug for Bounded<T, LO, HI> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: std::fmt::Display, const LO: u64, const HI: u64> std::fmt::Display for Bounded<T, LO, HI> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An unsigned integer type, widened for comparing.
pub trait Unsigned: Copy + std::fmt::Display {
    /// The value, losslessly.
    fn wide(self) -> u128;
}

macro_rules! unsigned {
    ($($t:ty),*) => {$(
        impl Unsigned for $t {
            fn wide(self) -> u128 {
                // Lossless: every unsigned type here is at most 64 bits.
                self as u128
            }
        }
    )*};
}
unsigned!(u8, u16, u32, u64, usize);

/// The lower end of a real range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Low {
    /// The value must be above this.
    Open(f64),
    /// The value may equal this.
    Closed(f64),
}

/// A real range: what a [`Real`] key may hold. NaN is in none.
pub trait RealRange {
    /// The lower end.
    const LOW: Low;
    /// The upper end, included.
    const HIGH: f64;
}

/// A real key within the range `R`.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct Real<T, R> {
    value: T,
    #[serde(skip)]
    range: PhantomData<R>,
}

impl<T: Copy + Into<f64> + std::fmt::Display, R: RealRange> Real<T, R> {
    /// `value`, where it is within the range.
    pub fn new(value: T) -> Option<Self> {
        let real = Real::unchecked(value);
        real.problem().is_none().then_some(real)
    }

    /// A default, or a test's value: [`Config::check`](super::Config::check)
    /// still judges it, and `config::tests` checks every default.
    pub(crate) const fn unchecked(value: T) -> Self {
        Real {
            value,
            range: PhantomData,
        }
    }

    /// The value: within the range in every checked config.
    pub fn get(self) -> T {
        self.value
    }
}

impl<T: Copy + Into<f64> + std::fmt::Display, R: RealRange> Ranged for Real<T, R> {
    fn problem(self) -> Option<String> {
        let x: f64 = self.value.into();
        let above = match R::LOW {
            Low::Open(l) => x > l,
            Low::Closed(l) => x >= l,
        };
        // NaN fails both comparisons.
        if above && x <= R::HIGH {
            return None;
        }
        let low = match R::LOW {
            Low::Open(l) => format!("more than {l}"),
            Low::Closed(l) => format!("at least {l}"),
        };
        Some(format!(
            "must be {low} and at most {}, got {}",
            Shown(R::HIGH),
            self.value
        ))
    }
}

/// An upper end as the message shows it: `f32::MAX` as the f32 it is.
struct Shown(f64);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == f64::from(f32::MAX) {
            f32::MAX.fmt(f)
        } else {
            self.0.fmt(f)
        }
    }
}

// Derived impls would ask the same of `R`, a marker.
impl<T: Clone, R> Clone for Real<T, R> {
    fn clone(&self) -> Self {
        Real {
            value: self.value.clone(),
            range: PhantomData,
        }
    }
}

impl<T: Copy, R> Copy for Real<T, R> {}

impl<T: PartialEq, R> PartialEq for Real<T, R> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: std::fmt::Debug, R> std::fmt::Debug for Real<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: std::fmt::Display, R> std::fmt::Display for Real<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

macro_rules! real_ranges {
    ($($(#[$doc:meta])* $name:ident: $low:expr, $high:expr;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub enum $name {}

        impl RealRange for $name {
            const LOW: Low = $low;
            const HIGH: f64 = $high;
        }
    )*};
}

real_ranges! {
    /// A probability or an IoU: 0 to 1.
    UnitInterval: Low::Closed(0.0), 1.0;
    /// Seconds, more than 0 and at most an hour.
    UpToAnHour: Low::Open(0.0), 3600.0;
    /// Seconds, more than 0 and at most a day: every derived `Duration`
    /// stays representable.
    UpToADay: Low::Open(0.0), 86_400.0;
    /// Messages a second, 0 (none) to 1000.
    RateUpTo1000: Low::Closed(0.0), 1000.0;
    /// Frames a second, 0.001 to 1000.
    FrameRate: Low::Closed(0.001), 1000.0;
    /// 0 or more, finite.
    NonNegative: Low::Closed(0.0), f32::MAX as f64;
    /// 0 or more; infinite means no limit.
    NonNegativeOrUnlimited: Low::Closed(0.0), f64::INFINITY;
    /// Seconds a batch waits for frames: 0 (none) to 0.1.
    BatchWait: Low::Closed(0.0), 0.1;
    /// A signal-to-noise ratio in dB asked of an INT8 model: more than 0,
    /// at most 100 (far past what INT8 can give).
    Decibels: Low::Open(0.0), 100.0;
    /// Hours, more than 0 and at most a year (snapshot retention).
    HoursUpToAYear: Low::Open(0.0), 8760.0;
    /// A polygon's coordinate, in pixels: within ±`MAX_COORDINATE`.
    Coordinate: Low::Closed(-(super::MAX_COORDINATE as f64)), super::MAX_COORDINATE as f64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_integer_knows_its_range() {
        type Batch = Bounded<u32, 1, 64>;
        assert_eq!(Batch::new(64).map(Batch::get), Some(64));
        assert!(Batch::new(0).is_none() && Batch::new(65).is_none());
        assert_eq!(
            Batch::unchecked(0).problem().as_deref(),
            Some("must be within 1..=64, got 0")
        );
        let wide: Bounded<u64, 1, { u64::MAX }> = Bounded::unchecked(u64::MAX);
        assert_eq!(wide.problem(), None);
        // Any number of the base type parses; the check judges it.
        let parsed: Batch = toml::Value::Integer(1000).try_into().unwrap();
        assert_eq!(parsed.get(), 1000);
        assert!(toml::Value::Integer(-1).try_into::<Batch>().is_err());
        // A flag is checked as it is parsed.
        assert_eq!("64".parse::<Batch>().map(Batch::get), Ok(64));
        assert_eq!(
            "0".parse::<Batch>().map(Batch::get),
            Err("must be within 1..=64, got 0".to_owned())
        );
        assert!("x".parse::<Batch>().is_err());
    }

    #[test]
    fn a_real_knows_its_range_and_refuses_nan() {
        type Seconds = Real<f64, UpToAnHour>;
        assert_eq!(Seconds::new(3600.0).map(Seconds::get), Some(3600.0));
        assert!(Seconds::new(0.0).is_none(), "open at 0");
        assert!(Seconds::new(f64::NAN).is_none());
        assert_eq!(
            Seconds::unchecked(0.0).problem().as_deref(),
            Some("must be more than 0 and at most 3600, got 0")
        );
        type Area = Real<f32, NonNegative>;
        assert_eq!(
            Area::unchecked(f32::INFINITY).problem().as_deref(),
            Some("must be at least 0 and at most 340282350000000000000000000000000000000, got inf")
        );
        assert!(Real::<f32, NonNegativeOrUnlimited>::new(f32::INFINITY).is_some());
        let parsed: Seconds = toml::Value::Float(f64::NAN).try_into().unwrap();
        assert!(parsed.get().is_nan() && parsed.problem().is_some());
    }
}
