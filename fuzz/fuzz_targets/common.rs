//! Shared by the targets: how a fuzz input is cut into a chunk schedule and a byte stream.
//!
//! Input layout: byte 0's low 3 bits give `n` (0..=7); the next `n` bytes are chunk sizes
//! (each byte + 1, so 1..=256), used in turn, cycling; the rest is the stream. `n == 0`
//! means one byte at a time. The seeds in `corpus/` are written in this layout by
//! `seeds.py`.

pub struct Input<'a> {
    pub sizes: Vec<usize>,
    pub data: &'a [u8],
}

pub fn split(raw: &[u8]) -> Input<'_> {
    let Some((&b0, rest)) = raw.split_first() else {
        return Input { sizes: vec![1], data: &[] };
    };
    let n = ((b0 & 0x07) as usize).min(rest.len());
    let sizes = if n == 0 {
        vec![1]
    } else {
        rest[..n].iter().map(|&b| b as usize + 1).collect()
    };
    Input { sizes, data: &rest[n..] }
}

/// `data` cut into consecutive pieces whose sizes cycle through `sizes`.
pub fn chunks<'a>(data: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut at = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        if at >= data.len() {
            return None;
        }
        let n = sizes[i % sizes.len()].min(data.len() - at);
        i += 1;
        let piece = &data[at..at + n];
        at += n;
        Some(piece)
    })
}

/// A header number as the scanners' `parse_int` accepts it (as Redis's `string2ll`): an
/// optional `-` and 1 to 18 ASCII digits, no leading zero, no `-0`.
pub fn canonical_int(s: &[u8]) -> bool {
    let negative = s.starts_with(b"-");
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    (1..=18).contains(&digits.len())
        && digits.iter().all(u8::is_ascii_digit)
        && !(digits[0] == b'0' && (digits.len() > 1 || negative))
}
