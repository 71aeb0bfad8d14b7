//! A client's `GenerateRequest` and a worker's `RunSequenceRequest`, decoded
//! from arbitrary protobuf bytes and taken through the conversions and checks
//! the coordinator and the worker apply.
use prost::Message;
use zeroshard_offload::convert::generation_params;
use zeroshard_offload::request::validate_prompt;
use zeroshard_proto::v1 as pb;

use crate::fixtures;

/// `data[0]` picks the message (even: `GenerateRequest`, odd:
/// `RunSequenceRequest`); the rest is its protobuf encoding.
pub fn request(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else { return };
    let (prompt, sampling) = if kind % 2 == 0 {
        let Ok(req) = pb::GenerateRequest::decode(bytes) else { return };
        let prompt = match req.prompt {
            None => return,
            // Text is encoded with the tokenizer, as the coordinator does.
            Some(pb::generate_request::Prompt::Text(t)) => match fixtures::tokenizer().encode(&t) {
                Ok(ids) => ids,
                Err(_) => return,
            },
            Some(pb::generate_request::Prompt::TokenIds(ids)) => ids.ids,
            // The fixture has no chat template: the coordinator refuses chat.
            Some(pb::generate_request::Prompt::Chat(_)) => return,
        };
        (prompt, req.sampling)
    } else {
        let Ok(req) = pb::RunSequenceRequest::decode(bytes) else { return };
        let mut prompt = req.prompt_token_ids;
        prompt.extend(&req.generated_token_ids);
        (prompt, req.sampling)
    };
    let config = fixtures::config();
    let prompt_ok = validate_prompt(config, &prompt).is_ok();
    if prompt_ok {
        assert!(!prompt.is_empty() && prompt.len() <= config.max_position_embeddings);
        assert!(prompt.iter().all(|&id| (id as usize) < config.vocab_size));
    }
    let params = generation_params(sampling);
    let _ = params.sampling.is_greedy();
    if params.sampling.validate().is_ok() {
        let s = &params.sampling;
        assert!(s.temperature.is_finite() && s.temperature >= 0.0, "{s:?}");
        assert!(s.top_p > 0.0 && s.top_p <= 1.0, "{s:?}");
        assert!(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0, "{s:?}");
        // Valid parameters survive the trip to a worker unchanged.
        let wire = pb::SamplingParams::from(&params);
        assert_eq!(generation_params(Some(wire)), params);
    }
}
