//! Changed byte ranges between two points.

use std::ops::Range;

use lifeboat_format::index::FixedIndex;
use serde::Serialize;

/// The difference of one volume between two points.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumeDiff {
    pub volume: String,
    /// `added` / `removed` when the volume is only in one point.
    pub status: String,
    pub size_a: Option<u64>,
    pub size_b: Option<u64>,
    /// Byte ranges whose content differs, merged and sorted.
    pub changed: Vec<Range<u64>>,
    pub changed_bytes: u64,
}

/// Byte ranges where `a` and `b` differ (chunks compared by id; a size
/// change counts the extra tail as changed).
pub fn diff_indexes(a: &FixedIndex, b: &FixedIndex) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let cs = a.chunk_size as u64;
    let n = a.chunks.len().max(b.chunks.len());
    let size = a.size.max(b.size);
    for i in 0..n {
        let ca = a.chunks.get(i);
        let cb = b.chunks.get(i);
        let start = i as u64 * cs;
        let end = (start + cs).min(size);
        // Chunk boundaries are the same; a tail past one size is changed.
        let same = ca == cb && end <= a.size.min(b.size);
        if same {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.end == start => r.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_format::ChunkId;

    #[test]
    fn merges_adjacent_changes() {
        let a = FixedIndex::empty(4096, 10 * 4096);
        let mut b = a.clone();
        b.chunks[2] = ChunkId([1; 32]);
        b.chunks[3] = ChunkId([2; 32]);
        b.chunks[7] = ChunkId([3; 32]);
        assert_eq!(diff_indexes(&a, &b), vec![8192..16384, 28672..32768]);
        assert!(diff_indexes(&a, &a).is_empty());
        let c = FixedIndex::empty(4096, 12 * 4096);
        assert_eq!(diff_indexes(&a, &c), vec![40960..49152]);
    }
}
