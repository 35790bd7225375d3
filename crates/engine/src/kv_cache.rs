//! Paged key/value memory. A model's [`KvPool`] is a fixed budget of
//! blocks, each holding the keys and values of [`KV_BLOCK_POSITIONS`]
//! positions of one layer. A sequence's [`KvCache`] is a block table per
//! layer, so sequences of any length share the pool without copying, and a
//! sliding-window layer gives its blocks back once they leave the window.
//!
//! Full blocks are also entered in a prefix index keyed by the hash of
//! every token up to their end: a later sequence that starts with the same
//! tokens takes those blocks instead of computing them again. Index
//! entries hold their blocks until memory runs short, and are then evicted
//! least recently used first.
//!
//! Invariants: a block is in the free list exactly when nothing refers to
//! it; a block that some sequence may still write to (its last, partial
//! block) is never shared; the index only holds full blocks.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use crate::error::EngineError;
use crate::model::ModelConfig;

/// Positions per block.
pub const KV_BLOCK_POSITIONS: usize = 16;

/// A slot of a block table whose block was given back (out of a sliding
/// window).
const RELEASED: u32 = u32::MAX;

/// A sequence's keys and values: for each layer, the blocks that hold its
/// positions in order, and the tokens at those positions.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    /// `tables[layer][i]` holds positions `i * KV_BLOCK_POSITIONS..`.
    tables: Vec<Vec<u32>>,
    /// The token at every position held.
    tokens: Vec<u32>,
    /// Chain hash of each full block entered in (or found in) the index.
    block_hashes: Vec<u64>,
}

impl KvCache {
    /// An empty cache, with no blocks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The tokens whose keys and values are held.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Blocks held for `layer` (those given back out of its window excluded).
    pub fn blocks_held(&self, layer: usize) -> usize {
        self.table(layer).iter().filter(|&&b| b != RELEASED).count()
    }

    /// The block table of `layer`.
    pub(crate) fn table(&self, layer: usize) -> &[u32] {
        self.tables.get(layer).map_or(&[], Vec::as_slice)
    }
}

/// One full block of the prefix index.
#[derive(Debug)]
struct IndexedBlock {
    /// The block of each layer (`RELEASED` never appears here).
    blocks: Box<[u32]>,
    /// The tokens of the block, checked on lookup against hash collisions.
    tokens: [u32; KV_BLOCK_POSITIONS],
    /// The chain hash of the block before (0 for the first).
    parent: u64,
    /// When the entry was last used (its key in `lru`).
    stamp: u64,
}

/// Fixed-budget key/value memory for one model, shared by its sequences.
#[derive(Debug)]
pub struct KvPool {
    key_width: usize,
    value_width: usize,
    /// Floats of one block: its keys, then its values.
    block_floats: usize,
    /// The window of each layer, `None` for global attention.
    windows: Vec<Option<usize>>,
    storage: Vec<f32>,
    /// References to each block: sequences plus the index.
    refs: Vec<u32>,
    /// Whether the index holds each block.
    indexed: Vec<bool>,
    /// Blocks that only the index holds (evictable).
    only_indexed: usize,
    free: Vec<u32>,
    /// Whether full blocks are entered in the prefix index.
    prefix_caching: bool,
    index: HashMap<u64, IndexedBlock>,
    /// Index entries by last use, oldest first.
    lru: BTreeSet<(u64, u64)>,
    clock: u64,
}

impl KvPool {
    /// A pool of `budget_bytes` for a model of `config` (at least one
    /// block per layer). The memory is reserved but only touched as blocks
    /// are first written. With `prefix_caching`, full blocks are kept for
    /// later sequences that start the same way.
    pub fn new(config: &ModelConfig, budget_bytes: usize, prefix_caching: bool) -> Self {
        let key_width = config.n_kv_heads * config.head_dim;
        let value_width = config.n_kv_heads * config.value_dim;
        let block_floats = KV_BLOCK_POSITIONS * (key_width + value_width);
        let block_bytes = block_floats * std::mem::size_of::<f32>();
        let blocks = (budget_bytes / block_bytes.max(1))
            .max(config.n_layers)
            .min(RELEASED as usize);
        let windows = (0..config.n_layers)
            .map(|l| {
                if config.layer_sliding.get(l).copied().unwrap_or(false) {
                    config.sliding_window
                } else {
                    None
                }
            })
            .collect();
        KvPool {
            key_width,
            value_width,
            block_floats,
            windows,
            storage: vec![0.0; blocks * block_floats],
            refs: vec![0; blocks],
            indexed: vec![false; blocks],
            only_indexed: 0,
            free: (0..blocks as u32).rev().collect(),
            prefix_caching,
            index: HashMap::new(),
            lru: BTreeSet::new(),
            clock: 0,
        }
    }

    /// A pool just large enough for `sequences` sequences of `positions`
    /// positions each, without prefix caching.
    pub fn for_positions(config: &ModelConfig, positions: usize, sequences: usize) -> Self {
        let per_layer = positions.div_ceil(KV_BLOCK_POSITIONS) + 1;
        let key_width = config.n_kv_heads * config.head_dim;
        let value_width = config.n_kv_heads * config.value_dim;
        let block_bytes = KV_BLOCK_POSITIONS * (key_width + value_width) * 4;
        let bytes = per_layer * config.n_layers * sequences.max(1) * block_bytes;
        Self::new(config, bytes, false)
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_floats * std::mem::size_of::<f32>()
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a new position could get now: free ones, and those that only
    /// the prefix index holds (which it gives up when asked).
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.only_indexed
    }

    /// Blocks that sequences hold (those only the index holds excluded).
    pub fn blocks_in_use(&self) -> usize {
        self.total_blocks() - self.available_blocks()
    }

    /// Positions the prefix index holds for the start of `tokens`, at most
    /// `limit`, in whole blocks.
    pub fn cached_prefix(&self, tokens: &[u32], limit: usize) -> usize {
        self.walk_prefix(tokens, limit).len() * KV_BLOCK_POSITIONS
    }

    /// The index entries (chain hashes) of the whole blocks that start
    /// `tokens`, within its first `limit` positions.
    fn walk_prefix(&self, tokens: &[u32], limit: usize) -> Vec<u64> {
        let mut found = Vec::new();
        if !self.prefix_caching {
            return found;
        }
        let mut parent = 0;
        for block in tokens[..limit.min(tokens.len())].chunks_exact(KV_BLOCK_POSITIONS) {
            let hash = chain_hash(parent, block);
            match self.index.get(&hash) {
                Some(e) if e.parent == parent && e.tokens == block => {
                    found.push(hash);
                    parent = hash;
                }
                _ => break,
            }
        }
        found
    }

    /// Starts `cache` (emptied first) with the blocks the index holds for
    /// the start of `tokens`, at most `limit` positions; returns the
    /// positions taken.
    pub fn attach_prefix(&mut self, cache: &mut KvCache, tokens: &[u32], limit: usize) -> usize {
        self.release(cache);
        let found = self.walk_prefix(tokens, limit);
        cache.tables = vec![Vec::with_capacity(found.len()); self.windows.len()];
        for hash in &found {
            let Some(entry) = self.index.get(hash) else {
                break;
            };
            for (table, &b) in cache.tables.iter_mut().zip(entry.blocks.iter()) {
                table.push(b);
            }
            let blocks = entry.blocks.clone();
            for b in blocks.iter() {
                self.update(*b, |refs, _| *refs += 1);
            }
        }
        self.touch_chain(&found);
        let positions = found.len() * KV_BLOCK_POSITIONS;
        cache.tokens.extend_from_slice(&tokens[..positions]);
        cache.block_hashes = found;
        positions
    }

    /// Blocks `cache` needs from the pool to grow by `count` positions (an
    /// upper bound: blocks leaving a window are not counted back).
    pub fn blocks_to_grow(&self, cache: &KvCache, count: usize) -> usize {
        let len = cache.len();
        let have = len.div_ceil(KV_BLOCK_POSITIONS);
        let need = (len + count).div_ceil(KV_BLOCK_POSITIONS);
        let new_per_layer = need - have;
        self.windows
            .iter()
            .map(|w| match w {
                // A window layer never holds more than its window's blocks.
                Some(w) => new_per_layer.min(w.div_ceil(KV_BLOCK_POSITIONS) + 1),
                None => new_per_layer,
            })
            .sum()
    }

    /// Blocks a sequence needs to hold positions `from..to` from nothing
    /// (from `from` on when the index gives the positions before).
    pub fn blocks_for_span(&self, from: usize, to: usize) -> usize {
        let first = from / KV_BLOCK_POSITIONS;
        let end = to.div_ceil(KV_BLOCK_POSITIONS);
        let blocks = end.saturating_sub(first);
        self.windows
            .iter()
            .map(|w| match w {
                Some(w) => blocks.min(w.div_ceil(KV_BLOCK_POSITIONS) + 1),
                None => blocks,
            })
            .sum()
    }

    /// Makes room in `cache` for `tokens` after its positions: gives back
    /// window blocks no query of theirs can see, then takes a block for
    /// every new block slot of every layer. The positions themselves are
    /// added by [`KvPool::commit`] once their keys and values are written.
    pub(crate) fn grow(&mut self, cache: &mut KvCache, tokens: usize) -> Result<(), EngineError> {
        if cache.tables.len() != self.windows.len() {
            self.release(cache);
            cache.tables = vec![Vec::new(); self.windows.len()];
        }
        let len = cache.len();
        for l in 0..self.windows.len() {
            if let Some(w) = self.windows[l] {
                // The first position the pass's first query sees.
                let oldest_seen = (len + 1).saturating_sub(w);
                let dead = oldest_seen / KV_BLOCK_POSITIONS;
                for i in 0..dead.min(cache.tables[l].len()) {
                    let b = std::mem::replace(&mut cache.tables[l][i], RELEASED);
                    if b != RELEASED {
                        self.drop_ref(b);
                    }
                }
            }
        }
        let need = (len + tokens).div_ceil(KV_BLOCK_POSITIONS);
        for l in 0..self.windows.len() {
            while cache.tables[l].len() < need {
                let Some(b) = self.take_block() else {
                    return Err(EngineError::OutOfKvMemory(format!(
                        "no free block for {tokens} more positions ({} blocks in the pool)",
                        self.total_blocks()
                    )));
                };
                cache.tables[l].push(b);
            }
        }
        Ok(())
    }

    /// Adds `tokens` as the positions whose keys and values were just
    /// written, and enters the blocks they completed in the index.
    pub(crate) fn commit(&mut self, cache: &mut KvCache, tokens: &[u32]) {
        cache.tokens.extend_from_slice(tokens);
        if !self.prefix_caching {
            return;
        }
        let full = cache.tokens.len() / KV_BLOCK_POSITIONS;
        while cache.block_hashes.len() < full {
            let i = cache.block_hashes.len();
            let block_tokens = &cache.tokens[i * KV_BLOCK_POSITIONS..(i + 1) * KV_BLOCK_POSITIONS];
            let parent = if i == 0 { 0 } else { cache.block_hashes[i - 1] };
            let hash = chain_hash(parent, block_tokens);
            if !self.index.contains_key(&hash) {
                let blocks: Option<Box<[u32]>> = cache
                    .tables
                    .iter()
                    .map(|t| t.get(i).copied().filter(|&b| b != RELEASED))
                    .collect();
                // A block already given back (a window narrower than a
                // block) ends the chain.
                let Some(blocks) = blocks else {
                    return;
                };
                let mut tokens = [0; KV_BLOCK_POSITIONS];
                tokens.copy_from_slice(block_tokens);
                for &b in blocks.iter() {
                    self.update(b, |refs, indexed| {
                        *refs += 1;
                        *indexed = true;
                    });
                }
                self.index.insert(
                    hash,
                    IndexedBlock {
                        blocks,
                        tokens,
                        parent,
                        stamp: 0,
                    },
                );
                self.lru.insert((0, hash));
                self.touch(hash);
            }
            cache.block_hashes.push(hash);
        }
    }

    /// Gives back every block of `cache` and empties it; the blocks it
    /// entered in the index become the most recently used.
    pub fn release(&mut self, cache: &mut KvCache) {
        let chain = std::mem::take(&mut cache.block_hashes);
        self.touch_chain(&chain);
        for table in cache.tables.drain(..) {
            for b in table {
                if b != RELEASED {
                    self.drop_ref(b);
                }
            }
        }
        cache.tokens.clear();
    }

    /// The keys at `position` of the sequence whose block table (of one
    /// layer) is `table`, all KV heads.
    pub(crate) fn keys(&self, table: &[u32], position: usize) -> &[f32] {
        let at = self.slot(table, position);
        &self.storage[at.0 + at.1 * self.key_width..][..self.key_width]
    }

    /// The values at `position`, all KV heads.
    pub(crate) fn values(&self, table: &[u32], position: usize) -> &[f32] {
        let at = self.slot(table, position);
        let values = at.0 + KV_BLOCK_POSITIONS * self.key_width;
        &self.storage[values + at.1 * self.value_width..][..self.value_width]
    }

    /// Writes the keys and values of consecutive positions from `position`
    /// (rows of `keys` and `values`) into the blocks of `table`.
    pub(crate) fn write(&mut self, table: &[u32], position: usize, keys: &[f32], values: &[f32]) {
        let (kw, vw) = (self.key_width, self.value_width);
        for (r, (k, v)) in keys
            .chunks_exact(kw)
            .zip(values.chunks_exact(vw))
            .enumerate()
        {
            let (base, offset) = self.slot(table, position + r);
            self.storage[base + offset * kw..][..kw].copy_from_slice(k);
            let values_at = base + KV_BLOCK_POSITIONS * kw + offset * vw;
            self.storage[values_at..][..vw].copy_from_slice(v);
        }
    }

    /// Where `position` lives: the block's first float and the offset in it.
    fn slot(&self, table: &[u32], position: usize) -> (usize, usize) {
        let block = table[position / KV_BLOCK_POSITIONS] as usize;
        (block * self.block_floats, position % KV_BLOCK_POSITIONS)
    }

    /// A free block with one reference, evicting index entries when none
    /// is free.
    fn take_block(&mut self) -> Option<u32> {
        while self.free.is_empty() {
            if !self.evict_one() {
                return None;
            }
        }
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Evicts the least recently used index entry that frees a block;
    /// false when none would.
    fn evict_one(&mut self) -> bool {
        let victim = self.lru.iter().find_map(|&(stamp, hash)| {
            let entry = self.index.get(&hash)?;
            let frees = entry.blocks.iter().any(|&b| self.refs[b as usize] == 1);
            frees.then_some((stamp, hash))
        });
        let Some((stamp, hash)) = victim else {
            return false;
        };
        self.lru.remove(&(stamp, hash));
        if let Some(entry) = self.index.remove(&hash) {
            for &b in entry.blocks.iter() {
                self.update(b, |_, indexed| *indexed = false);
                self.drop_ref(b);
            }
        }
        true
    }

    fn drop_ref(&mut self, b: u32) {
        self.update(b, |refs, _| *refs = refs.saturating_sub(1));
        if self.refs[b as usize] == 0 {
            self.free.push(b);
        }
    }

    /// Changes the references and index mark of block `b`, keeping the
    /// count of blocks only the index holds.
    fn update(&mut self, b: u32, change: impl FnOnce(&mut u32, &mut bool)) {
        let b = b as usize;
        let only_indexed = |refs: u32, indexed: bool| refs == 1 && indexed;
        let before = only_indexed(self.refs[b], self.indexed[b]);
        change(&mut self.refs[b], &mut self.indexed[b]);
        let after = only_indexed(self.refs[b], self.indexed[b]);
        match (before, after) {
            (false, true) => self.only_indexed += 1,
            (true, false) => self.only_indexed -= 1,
            _ => {}
        }
    }

    /// Marks the entries of a chain as just used, its end least recently,
    /// so that eviction takes a chain from its end.
    fn touch_chain(&mut self, chain: &[u64]) {
        for &hash in chain.iter().rev() {
            self.touch(hash);
        }
    }

    /// Marks an index entry as just used.
    fn touch(&mut self, hash: u64) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.index.get_mut(&hash) {
            self.lru.remove(&(entry.stamp, hash));
            entry.stamp = clock;
            self.lru.insert((clock, hash));
        }
    }
}

/// The hash of a block's tokens chained to the hash of every block before.
fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 stands for "no parent".
    h.finish().max(1)
}
