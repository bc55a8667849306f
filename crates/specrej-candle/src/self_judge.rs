//! The self-judge: the policy asked, right after its own answer, whether that answer is good.
//!
//! Reward = `logit(yes) − logit(no)` at the position after `prompt ++ response ++ after`,
//! where `prompt` is the policy's own prompt (the chat up to the assistant's turn), and
//! `after` ends the assistant's turn and asks the question in a new user turn
//! (`specrej_text::self_judge_segments`). A response that already ends with `after`'s
//! first token (the end-of-turn token, which the policy samples as its EOS) does not repeat
//! it. Unlike [`crate::JudgeScorer`], which quotes the answer inside a prompt of its own
//! and so must read every answer token again, this input starts with exactly the ids the
//! decoder ran: on the CPU, with the decoder's K/V lent ([`crate::KvShare`]), a decision or
//! the final ranking runs only `after` (and the one token the decoder sampled but never
//! ran) per row. Without a loan, or for a row the decoder no longer holds, the same input
//! runs from the prompt; the reward is the same bits either way (batch invariance).

use std::sync::Arc;

use candle_core::Tensor;
use specrej_core::{BackendError, Response, Scored, Scorer};

use crate::decoder::DEFAULT_KV_BUDGET_BYTES;
use crate::host::{PassError, host_vec};
use crate::kv::{BLOCK, Seq};
use crate::model::{Model, device_err};
use crate::scorer::{JudgeScorer, Runner};
use crate::share::KvShare;

/// The self-judge (see the module docs).
#[derive(Debug, Clone)]
pub struct SelfJudgeScorer {
    runner: Runner,
    after: Vec<u32>,
    yes: u32,
    no: u32,
    share: Option<KvShare>,
    /// On a GPU: the dense judge for the last prompt seen (`before` = that prompt).
    dense: Option<(Vec<u32>, JudgeScorer)>,
}

impl SelfJudgeScorer {
    /// A self-judge on `model` asking `after` (see the module docs).
    ///
    /// # Panics
    /// If `after` is empty or `yes`/`no` are outside the model's vocabulary.
    #[track_caller]
    pub fn new(model: Arc<Model>, after: Vec<u32>, yes: u32, no: u32) -> Self {
        let vocab = model.config.vocab_size;
        assert!(!after.is_empty(), "SelfJudgeScorer: `after` must not be empty");
        assert!(
            (yes as usize) < vocab && (no as usize) < vocab,
            "SelfJudgeScorer: yes ({yes}) / no ({no}) outside the vocabulary ({vocab})"
        );
        Self {
            runner: Runner { model, kv_budget_bytes: DEFAULT_KV_BUDGET_BYTES },
            after,
            yes,
            no,
            share: None,
            dense: None,
        }
    }

    /// Reuses the K/V a decoder on the same model lends through `share`
    /// ([`crate::CandleDecoder::lend_kv`]), and drops parked rows once judged or released.
    /// An error if `share` is for another model.
    pub fn borrowing(mut self, share: &KvShare) -> Result<Self, BackendError> {
        if !share.is_for(&self.runner.model) {
            return Err(BackendError::device("self-judge: the K/V share is for another model"));
        }
        self.share = Some(share.clone());
        Ok(self)
    }

    /// Limits the K/V the scoring passes hold at once (more rows go in chunks).
    pub fn with_kv_budget(mut self, kv_budget_bytes: usize) -> Self {
        self.runner.kv_budget_bytes = kv_budget_bytes;
        self
    }

    /// The response as a self-judge asking `after` reads it: without a final end-of-turn
    /// token (`after[0]`), which `after` supplies.
    pub fn answer<'t>(tokens: &'t [u32], after: &[u32]) -> &'t [u32] {
        match (tokens.split_last(), after.first()) {
            (Some((last, rest)), Some(end)) if last == end => rest,
            _ => tokens,
        }
    }

    /// The ids whose last position's logits give the reward.
    pub fn input(&self, prompt: &[u32], tokens: &[u32]) -> Vec<u32> {
        [prompt, Self::answer(tokens, &self.after), &self.after].concat()
    }

    fn score_any(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
        judged: bool,
    ) -> Result<Scored, BackendError> {
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        if prompt.is_empty() {
            return Err(BackendError::device("self-judge: the prompt is empty"));
        }
        let inputs: Vec<Vec<u32>> =
            responses.iter().map(|r| self.input(prompt, r.tokens)).collect();
        let context = self.runner.model.config.context_length;
        for input in &inputs {
            self.runner.check(input)?;
            if input.len() > context {
                return Err(BackendError::device(format!(
                    "self-judge: input of {} tokens exceeds the context length {context}",
                    input.len()
                )));
            }
        }
        let scored = if self.runner.on_host() {
            self.score_host(prompt, &inputs)
        } else {
            self.score_dense(prompt, responses)
        }?;
        if judged && let Some(share) = &self.share {
            let rows: Vec<u32> = responses.iter().map(|r| r.row).collect();
            share.release(&rows);
        }
        Ok(scored)
    }

    /// On a GPU: the dense judge with the prompt as its `before`.
    fn score_dense(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        if self.dense.as_ref().is_none_or(|(p, _)| p != prompt) {
            let judge = JudgeScorer::new(
                Arc::clone(&self.runner.model),
                prompt.to_vec(),
                self.after.clone(),
                self.yes,
                self.no,
            )
            .with_kv_budget(self.runner.kv_budget_bytes);
            self.dense = Some((prompt.to_vec(), judge));
        }
        let answers: Vec<Response<'_>> = responses
            .iter()
            .map(|r| Response { row: r.row, tokens: Self::answer(r.tokens, &self.after) })
            .collect();
        let Some((_, judge)) = self.dense.as_mut() else { unreachable!("set above") };
        specrej_core::block_on_ready(judge.score(prompt, &answers))
    }

    /// On the CPU: each input continues from the lent sequence sharing most of it (or from
    /// the prompt, run here once), all in one pass (chunked to the budget).
    /// `tokens_processed` counts the positions that ran here.
    fn score_host(&self, prompt: &[u32], inputs: &[Vec<u32>]) -> Result<Scored, BackendError> {
        let model = &*self.runner.model;
        let pool = self.runner.pool();
        let mut processed = 0u64;
        let mut prompt_seq: Option<Arc<Seq>> = None;
        // `[inputs]`: where each input starts, and how many of its positions are reused.
        let mut starts: Vec<(Seq, usize)> = Vec::with_capacity(inputs.len());
        for input in inputs {
            // At least the last position must run: its logits are the reward.
            let lent = self.share.as_ref().and_then(|s| s.borrow(input, input.len() - 1));
            match lent {
                Some(b) if b.reused >= prompt.len() => starts.push((b.seq, b.reused)),
                _ => {
                    if prompt_seq.is_none() {
                        let mut seq = Seq::new();
                        model
                            .forward_seqs(&mut [(&mut seq, prompt)], &pool)
                            .map_err(PassError::backend)?;
                        processed += prompt.len() as u64;
                        prompt_seq = Some(Arc::new(seq));
                    }
                    let Some(p) = &prompt_seq else { unreachable!("set above") };
                    starts.push((Seq::on_prefix(p, prompt.len()), prompt.len()));
                }
            }
        }
        let h = model.config.hidden_size;
        let mut last = Vec::with_capacity(inputs.len() * h); // [inputs, hidden] f32, final-normed
        let mut begin = 0;
        while begin < inputs.len() {
            // As many inputs as fit the pool's free blocks (at least one), each needing its
            // new positions' blocks and a copy of the lent block it writes into.
            let free = pool.capacity().saturating_sub(pool.in_use());
            let (mut end, mut blocks) = (begin, 0);
            while end < inputs.len() {
                let need = (inputs[end].len() - starts[end].1).div_ceil(BLOCK) + 1;
                if end > begin && blocks + need > free {
                    break;
                }
                blocks += need;
                end += 1;
            }
            let mut seqs: Vec<Seq> =
                starts[begin..end].iter_mut().map(|(s, _)| std::mem::take(s)).collect();
            let hidden = {
                let mut pass: Vec<(&mut Seq, &[u32])> = seqs
                    .iter_mut()
                    .zip(begin..end)
                    .map(|(s, i)| (s, &inputs[i][starts[i].1..]))
                    .collect();
                model.forward_seqs(&mut pass, &pool).map_err(PassError::backend)?
            }; // [Σ new positions, hidden]
            drop(seqs);
            let mut picked = Vec::with_capacity(end - begin); // each input's last position in `hidden`
            let mut offset = 0u32;
            for i in begin..end {
                let n = (inputs[i].len() - starts[i].1) as u32;
                offset += n;
                picked.push(offset - 1);
                processed += u64::from(n);
            }
            let normed = Tensor::new(picked.as_slice(), hidden.device())
                .and_then(|ids| hidden.index_select(&ids, 0))
                .and_then(|x| model.final_norm(&x))
                .and_then(|x| host_vec(&x))
                .map_err(device_err)?;
            last.extend_from_slice(&normed);
            begin = end;
        }
        let (yes, no) = (self.yes as usize, self.no as usize);
        let mut rewards = vec![0.0f32; inputs.len()];
        self.runner.head_chunks(&last, |k, row| rewards[k] = row[yes] - row[no])?;
        Ok(Scored { rewards, tokens_processed: processed })
    }
}

impl Scorer for SelfJudgeScorer {
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        std::future::ready(self.score_any(prompt, responses, true))
    }

    fn score_partial(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        std::future::ready(self.score_any(prompt, responses, false))
    }

    fn release(&mut self, rows: &[u32]) {
        if let Some(share) = &self.share {
            share.release(rows);
        }
    }

    /// With a loan: a finished answer is judged while the decoder still holds it (parked).
    fn eager(&self) -> bool {
        self.share.is_some()
    }
}
