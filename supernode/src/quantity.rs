//! Kubernetes resource quantities as the reference node's JSON carries them
//! (`resource.Quantity`: "500m", "4", "1536Mi", "110"), to and from fluidlet's integers
//! (millicores, bytes, pods).

/// Longest quantity string accepted (a longer one is refused before parsing).
pub const MAX_LEN: usize = 64;

/// A parsed quantity in thousandths of its unit (so "500m" = 500, "2" = 2000, "1Ki" =
/// 1024000): exact for every value fluidlet's integers can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Milli(pub u128);

impl Milli {
    /// As millicores (the quantity's thousandths), or `None` over u64.
    pub fn millicores(self) -> Option<u64> {
        u64::try_from(self.0).ok()
    }
    /// As whole units rounded up (bytes, pods: a fraction of a byte asks for one more).
    pub fn units_ceil(self) -> Option<u64> {
        u64::try_from(self.0.div_ceil(1000)).ok()
    }
}

/// Parses a Kubernetes quantity: an unsigned decimal number (digits, at most one '.'), then
/// an optional suffix: binary `Ki Mi Gi Ti Pi Ei`, decimal `m k M G T P E`, or an exponent
/// `e`/`E` followed by an integer. Negative quantities are refused (no resource is negative).
pub fn parse(s: &str) -> Result<Milli, String> {
    let bad = || format!("{s:?} is not a Kubernetes quantity");
    if s.is_empty() || s.len() > MAX_LEN {
        return Err(bad());
    }
    let s_ = s.strip_prefix('+').unwrap_or(s);
    let end = s_
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s_.len());
    let (num, suffix) = s_.split_at(end);
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(bad());
    }
    // Value = digits * 10^(exp10) * 2^(exp2), in thousandths.
    let digits: String = format!("{int}{frac}");
    let mut mantissa: u128 = 0;
    for d in digits.bytes() {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(d - b'0')))
            .ok_or_else(bad)?;
    }
    let mut exp10: i32 = 3 - i32::try_from(frac.len()).map_err(|_| bad())?;
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        e if e.starts_with(['e', 'E']) => {
            let n: i32 = e[1..].parse().map_err(|_| bad())?;
            if !(-30..=30).contains(&n) {
                return Err(bad());
            }
            exp10 += n;
        }
        _ => return Err(bad()),
    }
    let mut v = mantissa.checked_shl(exp2).ok_or_else(bad)?;
    if exp2 > 0 && v >> exp2 != mantissa {
        return Err(bad());
    }
    if exp10 >= 0 {
        for _ in 0..exp10 {
            v = v.checked_mul(10).ok_or_else(bad)?;
        }
    } else {
        // Below a thousandth: rounded up, as Kubernetes rounds a quantity up to its scale.
        let mut div: u128 = 1;
        for _ in 0..(-exp10) {
            div = div.checked_mul(10).ok_or_else(bad)?;
        }
        v = v.div_ceil(div);
    }
    Ok(Milli(v))
}

/// Millicores in canonical form: "500m", "4", "1500m".
pub fn cpu(millicores: u64) -> String {
    if millicores.is_multiple_of(1000) {
        (millicores / 1000).to_string()
    } else {
        format!("{millicores}m")
    }
}

/// Bytes in canonical binary form: the largest of Ki..Ei that divides it ("1536Mi", "8Gi"),
/// else plain bytes ("1000").
pub fn bytes(b: u64) -> String {
    const SUFFIX: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if b == 0 {
        return "0".into();
    }
    let mut v = b;
    let mut i = 0;
    while i < SUFFIX.len() && v.is_multiple_of(1024) {
        v /= 1024;
        i += 1;
    }
    if i == 0 {
        b.to_string()
    } else {
        format!("{v}{}", SUFFIX[i - 1])
    }
}

/// A count (pods) as a quantity: "110".
pub fn count(n: u64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_are_the_kubernetes_ones() {
        assert_eq!(cpu(500), "500m");
        assert_eq!(cpu(4000), "4");
        assert_eq!(cpu(1500), "1500m");
        assert_eq!(bytes(1536 << 20), "1536Mi");
        assert_eq!(bytes(8 << 30), "8Gi");
        assert_eq!(bytes(1000), "1000");
        assert_eq!(bytes(0), "0");
        assert_eq!(count(110), "110");
    }

    #[test]
    fn parses_what_it_formats_and_the_usual_spellings() {
        for m in [0u64, 1, 500, 1000, 1500, 4000, 123_456] {
            assert_eq!(parse(&cpu(m)).unwrap().millicores(), Some(m));
        }
        for b in [0u64, 1000, 1024, 1536 << 20, 8 << 30, 3 << 40] {
            assert_eq!(parse(&bytes(b)).unwrap().units_ceil(), Some(b));
        }
        assert_eq!(parse("0.5").unwrap().millicores(), Some(500));
        assert_eq!(parse("1.5Gi").unwrap().units_ceil(), Some(1536 << 20));
        assert_eq!(parse("2k").unwrap().units_ceil(), Some(2000));
        assert_eq!(parse("1e3").unwrap().units_ceil(), Some(1000));
        assert_eq!(parse("1M").unwrap().units_ceil(), Some(1_000_000));
    }

    #[test]
    fn refuses_what_is_not_a_quantity() {
        for s in [
            "", "-1", "abc", "1.2.3", "1Xi", "1e", "1e99", ".", "1 Gi", "9Ei9",
        ] {
            assert!(parse(s).is_err(), "{s:?} parsed");
        }
        assert!(parse(&"9".repeat(65)).is_err());
        // Beyond u128 thousandths: an error, no overflow.
        assert!(parse(&"9".repeat(60)).is_err());
        assert!(parse(&format!("{}Ei", "9".repeat(30))).is_err());
        assert_eq!(parse("999999999999Ei").unwrap().units_ceil(), None);
    }
}
