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
//! Keys and values are stored as half-precision floats (as llama.cpp
//! stores them by default): half the memory and half the bytes each
//! attention pass reads.
//!
//! Invariants: a block is in the free list exactly when nothing refers to
//! it; a block that some sequence may still write to (its last, partial
//! block) is never shared; the index only holds full blocks.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::error::EngineError;
use crate::model::ModelConfig;
use crate::quant::f32_row_to_f16;

/// Positions per block.
pub const KV_BLOCK_POSITIONS: usize = 16;

/// Key values converted together before going to their transposed places.
const KEYS_AT_ONCE: usize = 16;

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

/// An empty link of the index's use list.
const NIL: u32 = u32::MAX;

/// The prefix index: full blocks by chain hash, in a fixed number of slots
/// linked in order of use, so that entering, finding, touching and
/// evicting entries allocate nothing.
#[derive(Debug)]
struct PrefixIndex {
    n_layers: usize,
    by_hash: HashMap<u64, u32>,
    /// Per slot: its hash, its parent's hash (0 for the first block), its
    /// tokens (checked on lookup against hash collisions) and the block of
    /// each layer.
    hash: Vec<u64>,
    parent: Vec<u64>,
    tokens: Vec<u32>,
    blocks: Vec<u32>,
    /// The use list: `older`/`newer` links, from `oldest` to `newest`.
    older: Vec<u32>,
    newer: Vec<u32>,
    oldest: u32,
    newest: u32,
    free_slots: Vec<u32>,
}

impl PrefixIndex {
    fn new(slots: usize, n_layers: usize) -> Self {
        PrefixIndex {
            n_layers,
            by_hash: HashMap::with_capacity(slots),
            hash: vec![0; slots],
            parent: vec![0; slots],
            tokens: vec![0; slots * KV_BLOCK_POSITIONS],
            blocks: vec![0; slots * n_layers],
            older: vec![NIL; slots],
            newer: vec![NIL; slots],
            oldest: NIL,
            newest: NIL,
            free_slots: (0..slots as u32).rev().collect(),
        }
    }

    /// The slot of the entry for `hash`, when it follows `parent` with
    /// these `tokens`.
    fn find(&self, hash: u64, parent: u64, tokens: &[u32]) -> Option<u32> {
        let &slot = self.by_hash.get(&hash)?;
        let at = slot as usize;
        let same = self.parent[at] == parent
            && self.tokens[at * KV_BLOCK_POSITIONS..(at + 1) * KV_BLOCK_POSITIONS] == *tokens;
        same.then_some(slot)
    }

    fn contains(&self, hash: u64) -> bool {
        self.by_hash.contains_key(&hash)
    }

    /// The blocks of each layer of the entry in `slot`.
    fn blocks(&self, slot: u32) -> &[u32] {
        let at = slot as usize * self.n_layers;
        &self.blocks[at..at + self.n_layers]
    }

    /// Enters a block as the newest; `None` when every slot is taken.
    fn insert(&mut self, hash: u64, parent: u64, tokens: &[u32], blocks: &[u32]) -> Option<u32> {
        let slot = self.free_slots.pop()?;
        let at = slot as usize;
        self.hash[at] = hash;
        self.parent[at] = parent;
        self.tokens[at * KV_BLOCK_POSITIONS..(at + 1) * KV_BLOCK_POSITIONS].copy_from_slice(tokens);
        self.blocks[at * self.n_layers..(at + 1) * self.n_layers].copy_from_slice(blocks);
        self.by_hash.insert(hash, slot);
        self.link_newest(slot);
        Some(slot)
    }

    /// Takes the entry in `slot` out.
    fn remove(&mut self, slot: u32) {
        self.unlink(slot);
        self.by_hash.remove(&self.hash[slot as usize]);
        self.free_slots.push(slot);
    }

    /// Makes the entry in `slot` the newest.
    fn touch(&mut self, slot: u32) {
        self.unlink(slot);
        self.link_newest(slot);
    }

    fn link_newest(&mut self, slot: u32) {
        let at = slot as usize;
        self.older[at] = self.newest;
        self.newer[at] = NIL;
        match self.newest {
            NIL => self.oldest = slot,
            newest => self.newer[newest as usize] = slot,
        }
        self.newest = slot;
    }

    fn unlink(&mut self, slot: u32) {
        let at = slot as usize;
        let (older, newer) = (self.older[at], self.newer[at]);
        match older {
            NIL => self.oldest = newer,
            o => self.newer[o as usize] = newer,
        }
        match newer {
            NIL => self.newest = older,
            n => self.older[n as usize] = older,
        }
        self.older[at] = NIL;
        self.newer[at] = NIL;
    }

    /// The first entry, oldest first, that `pick` accepts.
    fn oldest_where(&self, pick: impl Fn(u32) -> bool) -> Option<u32> {
        let mut slot = self.oldest;
        while slot != NIL {
            if pick(slot) {
                return Some(slot);
            }
            slot = self.newer[slot as usize];
        }
        None
    }
}

/// Fixed-budget key/value memory for one model, shared by its sequences.
#[derive(Debug)]
pub struct KvPool {
    key_width: usize,
    value_width: usize,
    /// Values of one block: its keys, then its values.
    block_len: usize,
    /// The window of each layer, `None` for global attention.
    windows: Vec<Option<usize>>,
    /// Every block, as f16 bits.
    storage: Vec<u16>,
    /// References to each block: sequences plus the index.
    refs: Vec<u32>,
    /// Whether the index holds each block.
    indexed: Vec<bool>,
    /// Blocks that only the index holds (evictable).
    only_indexed: usize,
    free: Vec<u32>,
    /// Whether full blocks are entered in the prefix index.
    prefix_caching: bool,
    index: PrefixIndex,
    /// The blocks of one index entry being entered (kept to not allocate).
    layer_blocks: Vec<u32>,
}

impl KvPool {
    /// A pool of `budget_bytes` for a model of `config` (at least one
    /// block per layer). The memory is reserved but only touched as blocks
    /// are first written. With `prefix_caching`, full blocks are kept for
    /// later sequences that start the same way.
    pub fn new(config: &ModelConfig, budget_bytes: usize, prefix_caching: bool) -> Self {
        let key_width = config.n_kv_heads * config.head_dim;
        let value_width = config.n_kv_heads * config.value_dim;
        let block_len = KV_BLOCK_POSITIONS * (key_width + value_width);
        let block_bytes = block_bytes(config);
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
            block_len,
            windows,
            storage: vec![0; blocks * block_len],
            refs: vec![0; blocks],
            indexed: vec![false; blocks],
            only_indexed: 0,
            free: (0..blocks as u32).rev().collect(),
            prefix_caching,
            // Each block is in one entry at most.
            index: PrefixIndex::new(
                if prefix_caching {
                    blocks / config.n_layers.max(1) + 1
                } else {
                    0
                },
                config.n_layers,
            ),
            layer_blocks: Vec::with_capacity(config.n_layers),
        }
    }

    /// A pool just large enough for `sequences` sequences of `positions`
    /// positions each, without prefix caching.
    pub fn for_positions(config: &ModelConfig, positions: usize, sequences: usize) -> Self {
        let per_layer = positions.div_ceil(KV_BLOCK_POSITIONS) + 1;
        let bytes = per_layer * config.n_layers * sequences.max(1) * block_bytes(config);
        Self::new(config, bytes, false)
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_len * std::mem::size_of::<u16>()
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

    /// The index entries (slot and chain hash) of the whole blocks that
    /// start `tokens`, within its first `limit` positions.
    fn walk_prefix(&self, tokens: &[u32], limit: usize) -> Vec<(u32, u64)> {
        let mut found = Vec::new();
        if !self.prefix_caching {
            return found;
        }
        let mut parent = 0;
        for block in tokens[..limit.min(tokens.len())].chunks_exact(KV_BLOCK_POSITIONS) {
            let hash = chain_hash(parent, block);
            let Some(slot) = self.index.find(hash, parent, block) else {
                break;
            };
            found.push((slot, hash));
            parent = hash;
        }
        found
    }

    /// Starts `cache` (emptied first) with the blocks the index holds for
    /// the start of `tokens`, at most `limit` positions; returns the
    /// positions taken.
    pub fn attach_prefix(&mut self, cache: &mut KvCache, tokens: &[u32], limit: usize) -> usize {
        self.release(cache);
        let found = self.walk_prefix(tokens, limit);
        cache.tables.resize_with(self.windows.len(), Vec::new);
        for &(slot, _) in &found {
            for l in 0..self.windows.len() {
                let b = self.index.blocks(slot)[l];
                cache.tables[l].push(b);
                self.update(b, |refs, _| *refs += 1);
            }
        }
        // Later blocks of a chain count as used less recently than earlier
        // ones, so that eviction takes a chain from its end.
        for &(slot, _) in found.iter().rev() {
            self.index.touch(slot);
        }
        let positions = found.len() * KV_BLOCK_POSITIONS;
        cache.tokens.extend_from_slice(&tokens[..positions]);
        cache
            .block_hashes
            .extend(found.iter().map(|&(_, hash)| hash));
        positions
    }

    /// Makes room in `cache`'s own tables for `positions` positions, so that
    /// growing to them allocates nothing.
    pub fn reserve(&self, cache: &mut KvCache, positions: usize) {
        let blocks = positions.div_ceil(KV_BLOCK_POSITIONS);
        cache.tables.resize_with(self.windows.len(), Vec::new);
        for table in &mut cache.tables {
            table.reserve(blocks.saturating_sub(table.len()));
        }
        cache
            .tokens
            .reserve(positions.saturating_sub(cache.tokens.len()));
        cache
            .block_hashes
            .reserve(blocks.saturating_sub(cache.block_hashes.len()));
    }

    /// Blocks `cache` needs from the pool to grow by `count` positions (an
    /// upper bound: blocks leaving a window are not counted back).
    pub fn blocks_to_grow(&self, cache: &KvCache, count: usize) -> usize {
        let len = cache.len();
        let have = len.div_ceil(KV_BLOCK_POSITIONS);
        let need = (len + count).div_ceil(KV_BLOCK_POSITIONS);
        self.across_layers(need - have)
    }

    /// Blocks a sequence needs to hold positions `from..to` from nothing
    /// (from `from` on when the index gives the positions before).
    pub fn blocks_for_span(&self, from: usize, to: usize) -> usize {
        let first = from / KV_BLOCK_POSITIONS;
        let end = to.div_ceil(KV_BLOCK_POSITIONS);
        self.across_layers(end.saturating_sub(first))
    }

    /// Blocks for `per_layer` new block slots in every layer: a window
    /// layer never holds more than its window's blocks.
    fn across_layers(&self, per_layer: usize) -> usize {
        self.windows
            .iter()
            .map(|w| match w {
                Some(w) => per_layer.min(w.div_ceil(KV_BLOCK_POSITIONS) + 1),
                None => per_layer,
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
            if !self.index.contains(hash) {
                // A block already given back (a window narrower than a
                // block) ends the chain.
                let given_back = cache
                    .tables
                    .iter()
                    .any(|t| t.get(i).is_none_or(|&b| b == RELEASED));
                if given_back {
                    return;
                }
                let blocks = &mut self.layer_blocks;
                blocks.clear();
                blocks.extend(cache.tables.iter().map(|t| t[i]));
                if self
                    .index
                    .insert(hash, parent, block_tokens, blocks)
                    .is_none()
                {
                    return;
                }
                for l in 0..self.layer_blocks.len() {
                    let b = self.layer_blocks[l];
                    self.update(b, |refs, indexed| {
                        *refs += 1;
                        *indexed = true;
                    });
                }
            }
            cache.block_hashes.push(hash);
        }
    }

    /// Gives back every block of `cache` and empties it; the blocks it
    /// entered in the index become the most recently used.
    pub fn release(&mut self, cache: &mut KvCache) {
        for &hash in cache.block_hashes.iter().rev() {
            if let Some(&slot) = self.index.by_hash.get(&hash) {
                self.index.touch(slot);
            }
        }
        cache.block_hashes.clear();
        for table in &mut cache.tables {
            for b in table.drain(..) {
                if b != RELEASED {
                    self.drop_ref(b);
                }
            }
        }
        cache.tokens.clear();
    }

    /// The keys of block `block` of the sequence whose block table (of one
    /// layer) is `table`, transposed: for each key dimension (all KV heads
    /// in order), its values at the block's 16 positions.
    pub(crate) fn key_block(&self, table: &[u32], block: usize) -> &[u16] {
        let base = table[block] as usize * self.block_len;
        &self.storage[base..][..KV_BLOCK_POSITIONS * self.key_width]
    }

    /// The values of block `block` of the sequence whose block table is
    /// `table`: its 16 positions in order, all KV heads each.
    pub(crate) fn value_block(&self, table: &[u32], block: usize) -> &[u16] {
        let base = table[block] as usize * self.block_len + KV_BLOCK_POSITIONS * self.key_width;
        &self.storage[base..][..KV_BLOCK_POSITIONS * self.value_width]
    }

    /// The whole of block `block` (keys, then values) of the sequence whose
    /// block table is `table`.
    pub(crate) fn block(&self, table: &[u32], block: usize) -> &[u16] {
        let base = table[block] as usize * self.block_len;
        &self.storage[base..][..self.block_len]
    }

    /// Values of one position, all KV heads.
    pub(crate) fn value_width(&self) -> usize {
        self.value_width
    }

    /// The values at `position`, all KV heads.
    pub(crate) fn values(&self, table: &[u32], position: usize) -> &[u16] {
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
            let keys = &mut self.storage[base..][..KV_BLOCK_POSITIONS * kw];
            let mut halves = [0u16; KEYS_AT_ONCE];
            for (c, chunk) in k.chunks(KEYS_AT_ONCE).enumerate() {
                f32_row_to_f16(chunk, &mut halves);
                for (i, &key) in halves[..chunk.len()].iter().enumerate() {
                    keys[(c * KEYS_AT_ONCE + i) * KV_BLOCK_POSITIONS + offset] = key;
                }
            }
            let values_at = base + KV_BLOCK_POSITIONS * kw + offset * vw;
            f32_row_to_f16(v, &mut self.storage[values_at..][..vw]);
        }
    }

    /// Where `position` lives: the block's first value and the offset in it.
    fn slot(&self, table: &[u32], position: usize) -> (usize, usize) {
        let block = table[position / KV_BLOCK_POSITIONS] as usize;
        (block * self.block_len, position % KV_BLOCK_POSITIONS)
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
        let refs = &self.refs;
        let index = &self.index;
        let victim =
            index.oldest_where(|slot| index.blocks(slot).iter().any(|&b| refs[b as usize] == 1));
        let Some(slot) = victim else {
            return false;
        };
        for l in 0..self.index.n_layers {
            let b = self.index.blocks(slot)[l];
            self.update(b, |_, indexed| *indexed = false);
            self.drop_ref(b);
        }
        self.index.remove(slot);
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
}

/// Bytes of one block of a model of `config`: the keys and values of
/// [`KV_BLOCK_POSITIONS`] positions of one layer, as f16.
fn block_bytes(config: &ModelConfig) -> usize {
    let len = KV_BLOCK_POSITIONS * config.n_kv_heads * (config.head_dim + config.value_dim);
    len * std::mem::size_of::<u16>()
}

/// The hash of a block's tokens chained to the hash of every block before.
fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 stands for "no parent".
    h.finish().max(1)
}
