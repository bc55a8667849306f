//! The LLM-as-judge prompt: token segments around a response, and the answer tokens.

use crate::chat::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Marks where the response goes when rendering the judge chat; must not occur in a question.
pub const RESPONSE_PLACEHOLDER: &str = "\u{1}specrej-response\u{1}";

/// The judge's user turn before the response; `{question}` is replaced by the question.
///
/// It ends with a newline so that the response's first token starts a new pre-tokenizer word,
/// exactly as it did after `<|im_start|>assistant\n` when it was generated.
pub const JUDGE_BEFORE: &str =
    "Here is a question and a response.\n\nQuestion: {question}\n\nResponse:\n";

/// The judge's user turn after the response.
pub const JUDGE_AFTER: &str =
    "\n\nIs the response helpful, correct and well written? Answer with yes or no.";

/// The judge's user turn after an unfinished response (decisions of the partial judge).
pub const JUDGE_AFTER_PARTIAL: &str = "\n\nThe response is unfinished. So far, is it correct and on track to be helpful? Answer with yes or no.";

/// Answer pairs tried in order; the first whose words are both single tokens is used.
///
/// SmolLM2-135M-Instruct puts more probability on `Yes`/`No` than on `yes`/`no` as the first
/// token of its answer (measured with llama.cpp on judge prompts), so capitalised comes first.
pub const ANSWER_PAIRS: &[(&str, &str)] = &[("Yes", "No"), ("yes", "no")];

/// The judge prompt as token ids: `before + response + after`, then the next token's logits.
///
/// The reward is `logit(yes) - logit(no)` at the position after `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgeSegments {
    /// Tokens before the response: the chat up to the judge's `Response:\n` (with BOS if the
    /// model adds one).
    pub before: Vec<u32>,
    /// Tokens after the response: the question to the judge, end of the user turn, and the
    /// start of the assistant turn.
    pub after: Vec<u32>,
    /// The same after an unfinished response ([`JUDGE_AFTER_PARTIAL`]).
    pub after_partial: Vec<u32>,
    /// The "yes" answer token.
    pub yes: u32,
    /// The "no" answer token.
    pub no: u32,
}

impl JudgeSegments {
    /// Tokens the judge reads besides the response: `before` and the longest tail it asks
    /// with (`after`, or with `partial` also `after_partial`).
    pub fn overhead(&self, partial: bool) -> usize {
        let tail =
            if partial { self.after.len().max(self.after_partial.len()) } else { self.after.len() };
        self.before.len() + tail
    }
}

/// The self-judge's user turn after the policy's own answer: the policy is asked about the
/// answer it just gave, in the same conversation.
pub const SELF_JUDGE_QUESTION: &str =
    "Is your answer above helpful, correct and well written? Answer with yes or no.";

/// The self-judge's ids after the policy's answer, and its answer tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfJudgeSegments {
    /// The end of the assistant's turn, the user turn with [`SELF_JUDGE_QUESTION`], and the
    /// start of the next assistant turn.
    pub after: Vec<u32>,
    /// The "yes" answer token.
    pub yes: u32,
    /// The "no" answer token.
    pub no: u32,
}

/// The self-judge's segments for `template`: the chat of a user turn, the assistant's answer
/// and a user turn asking [`SELF_JUDGE_QUESTION`], split after the answer. Fails if the
/// template does not render an assistant turn's content exactly once, or if the chat before
/// the answer is not what the policy's prompt renders (then the answer would not follow
/// the ids the policy ran).
pub fn self_judge_segments(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<SelfJudgeSegments> {
    const USER: &str = "question";
    let chat = [
        Message::user(USER),
        Message::assistant(RESPONSE_PLACEHOLDER),
        Message::user(SELF_JUDGE_QUESTION),
    ];
    let rendered = template.render(&chat, true)?;
    let mut parts = rendered.split(RESPONSE_PLACEHOLDER);
    let (Some(before), Some(after), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::Judge(
            "the chat template must render the assistant's answer exactly once".into(),
        ));
    };
    if template.render(&[Message::user(USER)], true)? != before {
        return Err(Error::Judge(
            "the chat template renders the conversation before an answer unlike the prompt for it"
                .into(),
        ));
    }
    let after = tokenizer.encode(after, false)?;
    if after.is_empty() {
        return Err(Error::Judge("the self-judge's question renders to no tokens".into()));
    }
    let (yes, no) = answer_pair(tokenizer)?;
    Ok(SelfJudgeSegments { after, yes, no })
}

/// The first of [`ANSWER_PAIRS`] whose words are both single tokens.
fn answer_pair(tokenizer: &Tokenizer) -> Result<(u32, u32)> {
    ANSWER_PAIRS
        .iter()
        .find_map(|(y, n)| Some((tokenizer.single_token(y)?, tokenizer.single_token(n)?)))
        .ok_or_else(|| {
            Error::Judge(
                "no yes/no answer pair is a pair of single tokens in this vocabulary".into(),
            )
        })
}

/// Builds the judge prompt for `question` with `template`, tokenized by `tokenizer`.
///
/// The chat is one user message (the template may add its default system prompt); it is
/// rendered with a placeholder for the response and split around it, and each side is
/// tokenized on its own.
pub fn judge_segments(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    question: &str,
) -> Result<JudgeSegments> {
    if question.contains(RESPONSE_PLACEHOLDER) {
        return Err(Error::Judge("the question contains the response placeholder".into()));
    }
    let split = |after: &str| -> Result<(String, String)> {
        let content = format!(
            "{}{RESPONSE_PLACEHOLDER}{after}",
            JUDGE_BEFORE.replace("{question}", question)
        );
        let rendered = template.render(&[Message::user(content)], true)?;
        let mut parts = rendered.split(RESPONSE_PLACEHOLDER);
        let (Some(before), Some(after), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::Judge(
                "the chat template must render the user message exactly once".into(),
            ));
        };
        Ok((before.to_string(), after.to_string()))
    };
    let (before, after) = split(JUDGE_AFTER)?;
    let (before_partial, after_partial) = split(JUDGE_AFTER_PARTIAL)?;
    if before_partial != before {
        return Err(Error::Judge(
            "the chat template renders the judge's question before the response".into(),
        ));
    }
    let mut before_ids = tokenizer.encode(&before, false)?;
    if let Some(bos) = tokenizer.bos().filter(|_| tokenizer.adds_bos())
        && before_ids.first() != Some(&bos)
    {
        before_ids.insert(0, bos);
    }
    let after_ids = tokenizer.encode(&after, false)?;
    let after_partial = tokenizer.encode(&after_partial, false)?;
    let (yes, no) = answer_pair(tokenizer)?;
    Ok(JudgeSegments { before: before_ids, after: after_ids, after_partial, yes, no })
}
