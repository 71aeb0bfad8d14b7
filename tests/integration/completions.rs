//! What OpenAI clients ask of `/v1/completions` beyond one greedy answer,
//! against `up --http-listen` on stories260K: a completion's text follows its
//! prompt's (the space in front of its first word kept); a list of prompts
//! is answered with one choice per prompt; log-probabilities (with `echo`,
//! the prompt's too) agree with transformers' on the references within 0.02;
//! a limit past the model's context is refused naming both numbers; and
//! lm-evaluation-harness itself scores a task built from the references as
//! transformers does.
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::common::cluster::Cluster;
use crate::common::{completion_text, ids_of, model, read_json, shared};
use crate::openai::{http, json_body, python};

/// The references' largest allowed log-probability error.
const LOGPROB_TOLERANCE: f64 = 0.02;

fn stories() -> String {
    model("stories260K").display().to_string()
}

/// A cluster's HTTP front: its base URL and the key's header.
struct Front {
    base: String,
    auth: String,
}

impl Front {
    fn of(c: &mut Cluster) -> Self {
        Self { base: c.http(), auth: c.http_auth() }
    }
}

/// POSTs `body` to `/v1/completions`; (status, JSON body).
fn complete(c: &Front, body: &Value) -> (u16, Value) {
    let (code, text) = http(&c.base, "POST", "/v1/completions", Some(&body.to_string()), &[&c.auth]);
    (code, json_body(&text))
}

/// The events of a streamed answer (its `[DONE]` checked and left out).
fn events(c: &Front, body: &Value) -> Vec<Value> {
    let (code, text) = http(&c.base, "POST", "/v1/completions", Some(&body.to_string()), &[&c.auth]);
    assert_eq!(code, 200, "{text}");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("an event's JSON")).collect()
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().expect("a list").iter().map(Value::as_f64).collect()
}

/// lm-evaluation-harness's greedy test: every rated token is the best of its
/// listed alternatives (the same number, as the server wrote it).
fn is_greedy(logprobs: &Value, from: usize, to: usize) -> bool {
    (from..to).all(|i| {
        let best = logprobs["top_logprobs"][i]
            .as_object()
            .expect("alternatives")
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::NEG_INFINITY, f64::max);
        logprobs["token_logprobs"][i].as_f64() == Some(best)
    })
}

#[test]
fn completions_answer_lists_of_prompts_rate_tokens_and_keep_their_spacing() {
    let refs = read_json(&shared().join("refs/stories260K_greedy_sample.json"));
    let cases = refs["cases"].as_array().expect("cases");
    let ll = read_json(&shared().join("refs/stories260K_loglikelihood.json"));
    let items = ll["items"].as_array().expect("items");
    let mut cluster = Cluster::up(&["--model", &stories(), "--workers", "2", "--http-listen", "127.0.0.1:0"]);
    let c = Front::of(&mut cluster);

    // A list of prompts: one choice each, in order, each the text its tokens
    // add after the prompt's (one case's first word has a space in front,
    // which decoding the new tokens alone drops).
    assert!(
        cases.iter().any(|case| completion_text(case).starts_with(' ')),
        "no reference case checks the space in front of the first word"
    );
    let prompts: Vec<Value> = cases.iter().map(|case| case["input_ids"].clone()).collect();
    let greedy = json!({"model": "stories260K", "prompt": prompts, "max_tokens": 48, "temperature": 0,
                        "ignore_eos": true});
    let (code, v) = complete(&c, &greedy);
    assert_eq!(code, 200, "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), cases.len(), "{v}");
    for (i, (choice, case)) in choices.iter().zip(cases).enumerate() {
        assert_eq!(choice["index"], i, "{v}");
        assert_eq!(choice["text"], completion_text(case), "{}", case["name"]);
    }
    let prompt_tokens: usize = cases.iter().map(|case| ids_of(&case["input_ids"]).len()).sum();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], 48 * cases.len());
    // Text prompts too (the batch LangChain sends).
    let texts: Vec<Value> = cases.iter().map(|case| case["prompt"].clone()).collect();
    let mut by_text = greedy.clone();
    by_text["prompt"] = json!(texts);
    let (code, t) = complete(&c, &by_text);
    assert_eq!(code, 200, "{t}");
    assert_eq!(t["choices"], v["choices"], "text prompts answer as their ids do");

    // Streamed: each choice's events, in whatever order they come, add up to
    // its text, and each ends once.
    let mut streamed = greedy.clone();
    streamed["stream"] = json!(true);
    let mut texts = vec![String::new(); cases.len()];
    let mut finished = vec![0; cases.len()];
    for e in events(&c, &streamed) {
        let choice = &e["choices"][0];
        let i = choice["index"].as_u64().expect("index") as usize;
        texts[i].push_str(choice["text"].as_str().expect("text"));
        finished[i] += usize::from(choice["finish_reason"] == "length");
    }
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(texts[i], completion_text(case), "streamed {}", case["name"]);
    }
    assert_eq!(finished, vec![1; cases.len()]);

    // The generated tokens rated: greedy, so each is the best of its
    // alternatives; their pieces make up the text, offsets where each starts.
    let mut rated = json!({"model": "stories260K", "prompt": cases[1]["input_ids"], "max_tokens": 12,
                           "temperature": 0, "ignore_eos": true, "logprobs": 3});
    let (code, r) = complete(&c, &rated);
    assert_eq!(code, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let pieces: Vec<&str> =
        lp["tokens"].as_array().expect("tokens").iter().filter_map(Value::as_str).collect();
    assert_eq!(pieces.len(), 12, "{lp}");
    assert_eq!(pieces.concat(), r["choices"][0]["text"].as_str().expect("text"), "{lp}");
    assert!(is_greedy(lp, 0, 12), "{lp}");
    assert!(lp["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .all(|t| t.as_object().is_some_and(|t| t.len() == 3)));
    let offsets: Vec<usize> =
        pieces.iter().scan(0, |at, p| Some(std::mem::replace(at, *at + p.len()))).collect();
    assert_eq!(lp["text_offset"], json!(offsets));

    // logit_bias: -100 on the greedy first token hands the choice to the
    // runner-up of its alternatives; +100 on the third token makes it the first.
    let greedy_ids = ids_of(&cases[1]["new_token_ids"]);
    let mut alternatives: Vec<(&String, f64)> = lp["top_logprobs"][0]
        .as_object()
        .expect("alternatives")
        .iter()
        .map(|(piece, v)| (piece, v.as_f64().expect("a logprob")))
        .collect();
    alternatives.sort_by(|a, b| b.1.total_cmp(&a.1));
    let biased = |bias: Value| {
        let req = json!({"model": "stories260K", "prompt": cases[1]["input_ids"], "max_tokens": 1,
                         "temperature": 0, "logprobs": 0, "logit_bias": bias});
        let (code, b) = complete(&c, &req);
        assert_eq!(code, 200, "{b}");
        b["choices"][0]["logprobs"]["tokens"][0].as_str().expect("a token").to_string()
    };
    assert_eq!(&biased(json!({greedy_ids[0].to_string(): -100})), alternatives[1].0, "{lp}");
    assert_ne!(greedy_ids[2], greedy_ids[0]);
    assert_eq!(biased(json!({greedy_ids[2].to_string(): 100})), pieces[2], "{lp}");
    let (code, e) = complete(&c, &json!({"model": "stories260K", "prompt": "a", "logit_bias": {"99999": 1}}));
    assert!(code == 400 && e["error"]["message"].as_str().is_some_and(|m| m.contains("99999")), "{e}");

    // lm-evaluation-harness's loglikelihood request: context + continuation,
    // echoed and rated, one token generated. Each continuation token within
    // 0.02 of transformers', and greedy exactly where the reference is.
    let prompts: Vec<Value> = items
        .iter()
        .map(|it| json!([ids_of(&it["context_ids"]), ids_of(&it["continuation_ids"])].concat()))
        .collect();
    let scored = json!({"model": "stories260K", "prompt": prompts, "max_tokens": 1, "temperature": 0,
                        "logprobs": 1, "echo": true, "seed": 1234});
    let (code, s) = complete(&c, &scored);
    assert_eq!(code, 200, "{s}");
    let mut worst = 0f64;
    for (choice, it) in s["choices"].as_array().expect("choices").iter().zip(items) {
        let (ctx, cont) = (ids_of(&it["context_ids"]).len(), ids_of(&it["continuation_ids"]).len());
        let lp = &choice["logprobs"];
        let got = floats(&lp["token_logprobs"]);
        assert_eq!(got.len(), ctx + cont + 1, "{lp}");
        assert_eq!(got[0], None, "nothing rates the first token");
        for (j, want) in floats(&it["token_logprobs"]).into_iter().enumerate() {
            let err = (got[ctx + j].expect("a rated token") - want.expect("a reference")).abs();
            worst = worst.max(err);
            assert!(
                err <= LOGPROB_TOLERANCE,
                "{}: token {j}: {:?} against {want:?}",
                it["continuation"],
                got[ctx + j]
            );
        }
        assert_eq!(is_greedy(lp, ctx, ctx + cont), it["is_greedy"] == true, "{}: {lp}", it["continuation"]);
        let text = choice["text"].as_str().expect("text");
        assert!(text.starts_with(it["context"].as_str().expect("context")), "echo: {text:?}");
    }
    eprintln!("{} continuations rated, largest error {worst:.5} against transformers", items.len());

    // The prompt alone (`max_tokens` 0 with `echo`): the same numbers, nothing generated.
    let alone = json!({"model": "stories260K", "prompt": prompts[0], "max_tokens": 0, "logprobs": 0,
                       "echo": true});
    let (code, a) = complete(&c, &alone);
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["usage"]["completion_tokens"], 0, "{a}");
    let got = floats(&a["choices"][0]["logprobs"]["token_logprobs"]);
    let with_one = floats(&s["choices"][0]["logprobs"]["token_logprobs"]);
    assert_eq!(got.len(), with_one.len() - 1, "{a}");
    for (x, y) in got.iter().zip(&with_one) {
        assert!(x.zip(*y).map_or(x == y, |(x, y)| (x - y).abs() < 1e-4), "{got:?} against {with_one:?}");
    }

    // Limits: past the context, named; nothing to generate without echo; too
    // many alternatives; a batch past the cap.
    let (code, e) =
        complete(&c, &json!({"model": "stories260K", "prompt": [1, 403, 407], "max_tokens": 3000}));
    let message = e["error"]["message"].as_str().unwrap_or_default().to_string();
    assert_eq!(code, 400, "{e}");
    assert!(
        message.contains("3 tokens") && message.contains("3000") && message.contains("2048"),
        "{message}"
    );
    rated["max_tokens"] = json!(0);
    rated["logprobs"] = json!(null);
    assert_eq!(complete(&c, &rated).0, 400);
    rated["max_tokens"] = json!(2);
    rated["logprobs"] = json!(21);
    let (code, e) = complete(&c, &rated);
    assert!(code == 400 && e["error"]["message"].as_str().is_some_and(|m| m.contains("logprobs")), "{e}");
    let many = json!({"model": "stories260K", "prompt": vec![vec![1, 403]; 257], "max_tokens": 1});
    let (code, e) = complete(&c, &many);
    assert!(code == 400 && e["error"]["message"].as_str().is_some_and(|m| m.contains("256")), "{e}");
}

/// lm-evaluation-harness (`lm_eval`, in the test venv) runs a two-choice task
/// made of the references' context/continuation pairs through
/// `local-completions` against the cluster: each choice's log-likelihood
/// within 0.02 of transformers', `is_greedy` as the reference's, and so its
/// accuracy the reference's (the gold answers alternate, so it is 0.5).
#[test]
fn lm_evaluation_harness_scores_the_references_as_transformers_does() {
    let ll = read_json(&shared().join("refs/stories260K_loglikelihood.json"));
    let items = ll["items"].as_array().expect("items");
    let mut c = Cluster::up(&[
        "--model",
        &stories(),
        "--workers",
        "2",
        "--placement",
        "gather",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let work = tempfile::tempdir().expect("temp dir");
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/lm_eval_check.py"))
        .args([&format!("{}/v1/completions", c.http()), &stories()])
        .arg(shared().join("refs/stories260K_loglikelihood.json"))
        .arg(work.path())
        .env("OPENAI_API_KEY", c.http_auth().trim_start_matches("Authorization: Bearer "))
        .output()
        .expect("run lm_eval_check.py");
    assert!(out.status.success(), "lm_eval_check.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("its JSON");
    eprintln!("lm_eval {}: accuracy {}", got["lm_eval_version"], got["acc"]);
    let results = got["items"].as_array().expect("items");
    assert_eq!(results.len(), items.len(), "{got}");
    let mut right = 0;
    for (pair, it) in results.chunks(2).zip(items.chunks(2)) {
        for (r, it) in pair.iter().zip(it) {
            let err =
                (r["loglikelihood"].as_f64().expect("ll") - it["logprob_sum"].as_f64().expect("ref")).abs();
            assert!(err <= LOGPROB_TOLERANCE, "{}: {r} against {}", it["continuation"], it["logprob_sum"]);
            assert_eq!(r["is_greedy"], it["is_greedy"], "{}", it["continuation"]);
        }
        // The reference's pick: the likelier continuation.
        let pick = usize::from(it_sum(&it[1]) > it_sum(&it[0]));
        right += usize::from(pick == pair[0]["gold"].as_u64().expect("gold") as usize);
    }
    let want = right as f64 / (items.len() / 2) as f64;
    assert_eq!(got["acc"].as_f64(), Some(want), "{got}");
}

fn it_sum(it: &Value) -> f64 {
    it["logprob_sum"].as_f64().expect("logprob_sum")
}
