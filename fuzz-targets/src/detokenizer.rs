//! Token ids and stop strings through the incremental decoder, the stop
//! matcher and `TextStream`, checked against a full decode.
use zeroshard_coordinator::text_stream::TextStream;

use crate::fixtures;

/// Most ids one input decodes (each push decodes a window: keep inputs fast).
const MAX_IDS: usize = 256;

/// `data`: a header byte (bits 0–1: stop strings, bit 2: decode after a
/// context), then per stop string a length byte and that many bytes (an odd
/// length picks a piece of the decoded text instead, so stops also match),
/// then the ids as little-endian u16 (many outside the 512-token vocabulary).
pub fn detokenizer(data: &[u8]) {
    let tok = fixtures::tokenizer();
    let Some((&head, mut rest)) = data.split_first() else { return };
    let mut stop_specs = Vec::new();
    for _ in 0..head & 3 {
        let Some((&len, r)) = rest.split_first() else { return };
        let n = (len as usize / 2).min(r.len());
        stop_specs.push((len % 2 == 1, &r[..n]));
        rest = &r[n..];
    }
    let ids: Vec<u32> =
        rest.chunks_exact(2).take(MAX_IDS).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
    let (context, generated) = if head & 4 != 0 { ids.split_at(ids.len() / 3) } else { (&[][..], &ids[..]) };
    let Ok(full) = tok.decode(generated, false) else { return };

    // The decoder alone: the deltas concatenate to the full decode; after a
    // context, to what the full decode adds after it.
    let stream_of = |dec: &mut zeroshard_coordinator::tokenizer::IncrementalDecoder<'_>| -> Vec<String> {
        let mut deltas: Vec<String> =
            generated.iter().map(|&id| dec.push(id).expect("decode of ids that decoded in full")).collect();
        deltas.push(dec.finish().expect("decode of ids that decoded in full"));
        assert_eq!(dec.finish().expect("finish again"), "", "a second finish adds nothing");
        deltas
    };
    let deltas = stream_of(&mut tok.decoder());
    assert_eq!(deltas.concat(), full, "streamed decode of {generated:?}");
    if !context.is_empty() {
        let Ok(mut dec) = tok.decoder_with_context(context) else { return };
        let streamed = stream_of(&mut dec).concat();
        let whole = tok.decode(&ids, false).expect("decode");
        assert!(whole.ends_with(&streamed), "{ids:?}: {streamed:?} is not a suffix of {whole:?}");
    }

    // Stop strings on top: the text up to the earliest match, never any of it.
    let stops: Vec<String> = stop_specs
        .iter()
        .map(|&(from_text, bytes)| {
            if from_text && !full.is_empty() {
                let start = floor_char(&full, bytes.first().map_or(0, |&b| b as usize) % full.len());
                let end = floor_char(&full, (start + bytes.len().max(1)).min(full.len()));
                full[start..end].to_string()
            } else {
                String::from_utf8_lossy(bytes).into_owned()
            }
        })
        .collect();
    let mut stream = TextStream::new(Some(tok), &[], &stops).expect("a tokenizer is given");
    let mut out = String::new();
    let mut stopped = false;
    for &id in generated {
        let delta = stream.push(id).expect("decode");
        assert!(!stopped || delta.text.is_empty(), "text after the stop");
        out.push_str(&delta.text);
        stopped |= delta.stopped;
    }
    if !stopped {
        out.push_str(&stream.finish().expect("decode"));
    }
    assert_eq!(out, stream.text, "TextStream.text is what it returned");
    // The stream stops after the first delta that completes a stop string,
    // cut where the earliest stop in the text so far starts (a stop that
    // completes first wins over a longer one that started earlier).
    let mut so_far = String::new();
    let mut expected = None;
    let mut stopped_at = None;
    for (i, d) in deltas.iter().enumerate() {
        so_far.push_str(d);
        if let Some(at) = stops.iter().filter(|s| !s.is_empty()).filter_map(|s| so_far.find(s.as_str())).min()
        {
            expected = Some(&so_far[..at]);
            stopped_at = Some(i);
            break;
        }
    }
    // (A stop completed by the final flush ends the text but no push reports it.)
    assert_eq!(stopped, stopped_at.is_some_and(|i| i < generated.len()), "stops {stops:?} in {full:?}");
    assert_eq!(out, expected.unwrap_or(&full), "stops {stops:?} in {full:?}, deltas {deltas:?}");
}

/// The largest char boundary of `s` at or below `i`.
fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
