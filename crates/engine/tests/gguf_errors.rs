//! Every way a GGUF file can be broken gives a clear error, never a panic or
//! a huge allocation.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use neocloud_engine::gguf::GgufFile;
use neocloud_engine::model::Model;
use neocloud_testkit::gguf_writer::{GgufBuilder, Tensor, Value};

fn valid() -> GgufBuilder {
    GgufBuilder::new()
        .meta("general.architecture", Value::Str("llama".into()))
        .meta("general.name", Value::Str("tiny".into()))
        .tensor(Tensor::f32("a", &[4, 2], &[1.0; 8]))
        .tensor(Tensor::f32("b", &[32], &[2.0; 32]))
}

fn expect_error(bytes: Vec<u8>, needle: &str) {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("accepted a file that should fail with {needle:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not mention {needle:?}"
            );
        }
    }
}

/// Byte offset of the first tensor info (after the metadata).
fn tensor_info_offset(b: &GgufBuilder) -> usize {
    let mut without_tensors = b.clone();
    without_tensors.tensors.clear();
    // Header + metadata are identical; the tensor infos follow them.
    let bytes = without_tensors.build();
    let mut end = bytes.len();
    while end > 0 && bytes[end - 1] == 0 {
        end -= 1;
    }
    // The last metadata value is the string "tiny".
    end
}

#[test]
fn valid_file_round_trips() {
    let f = GgufFile::from_bytes(valid().build()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(
        f.meta("general.name").and_then(|v| v.as_str()),
        Some("tiny")
    );
    let a = f.tensor("a").unwrap();
    assert_eq!((a.row_len(), a.rows()), (4, 2));
    assert_eq!(f.tensor_bytes(f.tensor("b").unwrap()).len(), 128);
    assert_eq!(a.file_offset % 32, 0);
}

#[test]
fn bad_magic() {
    let mut b = valid().build();
    b[0] = b'X';
    expect_error(b, "bad magic");
}

#[test]
fn unsupported_version() {
    let mut b = valid().build();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    expect_error(b, "version 7");
}

#[test]
fn truncated_anywhere() {
    let full = valid().build();
    // Every cut through header, metadata and tensor infos is a clean error.
    let header_end = full.len() - 160;
    for cut in 0..header_end {
        assert!(
            GgufFile::from_bytes(full[..cut].to_vec()).is_err(),
            "cut at {cut}"
        );
    }
    // A cut through the data is caught by the tensor bounds check.
    expect_error(full[..full.len() - 1].to_vec(), "past the end");
}

#[test]
fn absurd_counts_do_not_allocate() {
    let mut b = valid().build();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_error(b, "tensor count");
    let mut b = valid().build();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    expect_error(b, "metadata count");
}

/// A u8 array takes a byte an item in the file and far more in memory:
/// the items of all arrays together are bounded, whatever the file holds.
#[test]
fn metadata_arrays_are_bounded_in_memory_not_only_by_the_file() {
    let items = neocloud_engine::gguf::MAX_METADATA_ARRAY_ITEMS as usize;
    let half = vec![0u8; items / 2 + 1];
    let bytes = GgufBuilder::new()
        .meta("a", Value::U8Array(half.clone()))
        .meta("b", Value::U8Array(half))
        .build();
    expect_error(bytes, "metadata arrays hold more than");
    let fits = GgufBuilder::new()
        .meta("a", Value::U8Array(vec![1u8; 1000]))
        .build();
    assert!(GgufFile::from_bytes(fits).is_ok());
}

#[test]
fn huge_string_length() {
    let mut b = valid().build();
    // The first key's length field follows the 24-byte header.
    b[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_error(b, "runs past the end");
}

#[test]
fn huge_array_length() {
    let bytes = GgufBuilder::new()
        .meta("tokens", Value::StrArray(vec!["a".into(), "b".into()]))
        .build();
    let mut b = bytes.clone();
    // key len (8) + "tokens" (6) + type (4) + item type (4) -> count at 24+22.
    b[46..54].copy_from_slice(&(1u64 << 62).to_le_bytes());
    expect_error(b, "array of");
}

#[test]
fn unknown_metadata_type() {
    let mut b = valid().build();
    // Type of the first value: after header (24), key length (8) and key (20 bytes).
    let key_len = "general.architecture".len();
    let at = 24 + 8 + key_len;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    expect_error(b, "unknown metadata type 99");
}

#[test]
fn unknown_tensor_type() {
    let mut builder = valid();
    builder.tensors[0].type_id = 3; // Q4_1: a real GGML type we do not support
    expect_error(builder.build(), "unknown type 3");
    let mut builder = valid();
    builder.tensors[0].type_id = 1234;
    expect_error(builder.build(), "unknown type 1234");
}

#[test]
fn absurd_dimensions() {
    let mut builder = valid();
    builder.tensors[0].dims = vec![1 << 32, 1 << 32];
    expect_error(builder.build(), "absurd dimensions");
    let mut builder = valid();
    builder.tensors[0].dims = vec![4, 0];
    expect_error(builder.build(), "zero dimension");
    let mut builder = valid();
    builder.tensors[0].dims = vec![1, 1, 1, 1, 1];
    expect_error(builder.build(), "5 dimensions");
}

#[test]
fn row_not_a_multiple_of_the_block() {
    let mut builder = valid();
    builder.tensors[1].type_id = 8; // Q8_0 needs rows of 32 values
    builder.tensors[1].dims = vec![16];
    expect_error(builder.build(), "not a multiple");
}

#[test]
fn offsets_past_the_end_or_misaligned() {
    let builder = valid();
    let bytes = builder.build();
    let info = tensor_info_offset(&builder);
    // Tensor "a": name (8 + 1), n_dims (4), dims (16), type (4), then offset.
    let off_at = info + 9 + 4 + 16 + 4;
    let mut b = bytes.clone();
    b[off_at..off_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_error(b, "past the end");
    let mut b = bytes.clone();
    b[off_at..off_at + 8].copy_from_slice(&(u64::MAX / 32 * 32).to_le_bytes());
    expect_error(b, "offset overflows");
    let mut b = bytes;
    b[off_at..off_at + 8].copy_from_slice(&4u64.to_le_bytes());
    expect_error(b, "not aligned");
}

#[test]
fn duplicate_tensor_names() {
    let builder = valid().tensor(Tensor::f32("a", &[4, 2], &[0.0; 8]));
    expect_error(builder.build(), "appears twice");
}

#[test]
fn bad_alignment() {
    let b = valid().meta("general.alignment", Value::U32(3)).build();
    expect_error(b, "alignment");
}

#[test]
fn a_valid_file_that_is_not_a_model_is_a_model_error() {
    let f = GgufFile::from_bytes(valid().build()).unwrap();
    let err = Model::load(&f).unwrap_err().to_string();
    assert!(err.contains("llama.block_count"), "{err}");
    let f = GgufFile::from_bytes(
        GgufBuilder::new()
            .meta("general.architecture", Value::Str("mamba".into()))
            .build(),
    )
    .unwrap();
    let err = Model::load(&f).unwrap_err().to_string();
    assert!(err.contains("not supported"), "{err}");
}

#[test]
fn missing_file_is_an_io_error() {
    let err = GgufFile::open(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
}
