//! The reward models the CLI offers (`--reward`, `--reward-url`, `--rescore`), as one
//! [`Scorer`] type.

use crate::backend::Policy;
use crate::model::Text;
use anyhow::{Context, Result};
use specrej_candle::{
    JudgeScorer, KvShare, LikelihoodScorer, LoadOptions, SelfJudgeScorer, WeightFormat,
};
use specrej_core::{BackendError, Response, Scored, Scorer};
use specrej_reward::{RemoteScorer, RewardModel, RewardScorer};
use specrej_wgpu::{WgpuJudgeScorer, WgpuLikelihoodScorer};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// `--reward`: a built-in scorer on the policy itself, or a reward-model directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewardSpec {
    /// The policy asked whether the answer is good: logit(Yes) − logit(No).
    Judge,
    /// The same judge, asked at decisions whether an unfinished answer is on track so far.
    PartialJudge,
    /// The policy asked, after its own answer in the same conversation, whether the answer
    /// is good: logit(Yes) − logit(No). On the CPU it reads the decoder's K/V of the
    /// answer instead of reading the answer again.
    SelfJudge,
    /// −perplexity of the answer under the policy.
    Likelihood,
    /// A Hugging Face `*ForSequenceClassification` directory.
    Model(PathBuf),
}

impl FromStr for RewardSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "judge" => Ok(RewardSpec::Judge),
            "partial-judge" => Ok(RewardSpec::PartialJudge),
            "self-judge" => Ok(RewardSpec::SelfJudge),
            "likelihood" => Ok(RewardSpec::Likelihood),
            "" => Err(
                "expected judge, partial-judge, self-judge, likelihood or a reward-model directory"
                    .to_string(),
            ),
            path => Ok(RewardSpec::Model(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for RewardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RewardSpec::Judge => f.write_str("judge"),
            RewardSpec::PartialJudge => f.write_str("partial-judge"),
            RewardSpec::SelfJudge => f.write_str("self-judge"),
            RewardSpec::Likelihood => f.write_str("likelihood"),
            RewardSpec::Model(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// `--rescore`: how partial answers are re-scored at each decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Rescore {
    /// Keep the reward model's K/V cache per surviving row; a decision runs only the tokens
    /// added since the last one.
    #[default]
    Incremental,
    /// Re-run the reward model on every whole answer at every decision (the paper's code).
    Full,
}

/// The reward flags shared by `generate` and `bench paper`.
#[derive(Clone, Debug, clap::Args)]
pub struct RewardArgs {
    /// The reward model: `judge` (the policy asked whether the answer is good),
    /// `partial-judge` (the same, asked at decisions whether the unfinished answer is on
    /// track), `self-judge` (the policy asked right after its own answer, in the same
    /// conversation: on the CPU it reuses the answer's K/V), `likelihood` (−perplexity
    /// under the policy), or a Hugging Face reward-model directory
    /// (`*ForSequenceClassification`: config.json, *.safetensors, tokenizer.json).
    #[arg(
        long,
        default_value = "judge",
        value_name = "judge|partial-judge|self-judge|likelihood|DIR"
    )]
    pub reward: RewardSpec,
    /// Score with a reward server instead (`http://host:port/path`, the JSON protocol of
    /// `specrej-reward-server`).
    #[arg(long, value_name = "URL", conflicts_with = "reward")]
    pub reward_url: Option<String>,
    /// How partial answers are re-scored at each decision.
    #[arg(long, value_enum, default_value = "incremental")]
    pub rescore: Rescore,
}

impl RewardArgs {
    /// What the reports call this reward.
    pub fn describe(&self) -> String {
        match &self.reward_url {
            Some(url) => format!("remote {url}"),
            None => self.reward.to_string(),
        }
    }

    /// Checks what needs no loading, so a bad flag fails before the policy is loaded.
    pub fn check(&self) -> Result<()> {
        if let (None, RewardSpec::Model(dir)) = (&self.reward_url, &self.reward)
            && !dir.is_dir()
        {
            anyhow::bail!(
                "--reward {}: not judge, partial-judge, self-judge, likelihood or a reward-model directory",
                dir.display()
            );
        }
        if let Some(url) = &self.reward_url
            && let Err(e) = specrej_reward::check_url(url)
        {
            anyhow::bail!("--reward-url: {e}");
        }
        Ok(())
    }

    /// Loads what is shared by every question (a reward model's weights), on `device`.
    pub fn load(&self, device: specrej_candle::Device) -> Result<RewardSource> {
        self.check()?;
        let kind = match (&self.reward_url, &self.reward) {
            (Some(url), _) => Kind::Remote(url.clone()),
            (None, RewardSpec::Judge) => Kind::Judge { partial: false },
            (None, RewardSpec::PartialJudge) => Kind::Judge { partial: true },
            (None, RewardSpec::SelfJudge) => Kind::SelfJudge,
            (None, RewardSpec::Likelihood) => Kind::Likelihood,
            (None, RewardSpec::Model(dir)) => {
                // f32 so incremental and full scoring agree to rounding (see specrej-reward).
                let rm = RewardModel::load(
                    dir,
                    &LoadOptions { device, weights: WeightFormat::F32, kv: Default::default() },
                )
                .with_context(|| format!("loading the reward model {}", dir.display()))?;
                Kind::Model(rm)
            }
        };
        Ok(RewardSource { kind, rescore: self.rescore })
    }
}

#[derive(Debug)]
enum Kind {
    Judge { partial: bool },
    SelfJudge,
    Likelihood,
    Model(Arc<RewardModel>),
    Remote(String),
}

/// A loaded reward, ready to make one scorer per question.
#[derive(Debug)]
pub struct RewardSource {
    kind: Kind,
    rescore: Rescore,
}

impl RewardSource {
    /// Tokens a judge reads besides the answer: the judge's question quotes `user` and has
    /// the longest tail it asks with; the self-judge reads the policy's prompt
    /// (`prompt_len` tokens) and its question. `None` for the rewards that read only the
    /// policy's prompt and answer, or apply their own limit.
    pub fn judge_overhead(
        &self,
        text: &Text,
        user: &str,
        prompt_len: usize,
    ) -> Result<Option<usize>> {
        match self.kind {
            Kind::Judge { partial } => Ok(Some(
                specrej_text::judge_segments(&text.tokenizer, &text.template, user)?
                    .overhead(partial),
            )),
            Kind::SelfJudge => Ok(Some(
                prompt_len
                    + specrej_text::self_judge_segments(&text.tokenizer, &text.template)?
                        .after
                        .len(),
            )),
            _ => Ok(None),
        }
    }

    /// A fresh scorer (no cached state) for the user's message `user`; `policy` and `text`
    /// are the policy model (for the built-in rewards, which run on its backend) and its
    /// tokenizer and chat template. On wgpu the built-in rewards re-score in full.
    pub fn scorer(&self, policy: &Policy, text: &Text, user: &str) -> Result<Reward> {
        let incremental = self.rescore == Rescore::Incremental;
        Ok(match &self.kind {
            Kind::Judge { partial } => {
                let s = specrej_text::judge_segments(&text.tokenizer, &text.template, user)?;
                match policy {
                    Policy::Candle(model) => {
                        let mut judge =
                            JudgeScorer::new(model.clone(), s.before, s.after, s.yes, s.no);
                        if *partial {
                            judge = judge.with_partial(s.after_partial);
                        }
                        Reward::Judge(if incremental { judge.incremental() } else { judge })
                    }
                    Policy::Wgpu(_) if *partial => {
                        anyhow::bail!(
                            "--reward partial-judge runs on the cpu and cuda backends (the wgpu judge has one question)"
                        )
                    }
                    Policy::Wgpu(model) => Reward::WgpuJudge(WgpuJudgeScorer::new(
                        model.clone(),
                        s.before,
                        s.after,
                        s.yes,
                        s.no,
                    )),
                }
            }
            Kind::SelfJudge => {
                let s = specrej_text::self_judge_segments(&text.tokenizer, &text.template)?;
                match policy {
                    Policy::Candle(model) => {
                        let share = KvShare::new(model);
                        let judge = SelfJudgeScorer::new(model.clone(), s.after, s.yes, s.no)
                            .borrowing(&share)?;
                        Reward::SelfJudge(judge, share)
                    }
                    Policy::Wgpu(_) => {
                        anyhow::bail!("--reward self-judge runs on the cpu and cuda backends")
                    }
                }
            }
            Kind::Likelihood => match policy {
                Policy::Candle(model) => {
                    let likelihood = LikelihoodScorer::new(model.clone());
                    Reward::Likelihood(if incremental {
                        likelihood.incremental()
                    } else {
                        likelihood
                    })
                }
                Policy::Wgpu(model) => {
                    Reward::WgpuLikelihood(WgpuLikelihoodScorer::new(model.clone()))
                }
            },
            Kind::Model(rm) => {
                let tokenizer = text.tokenizer.clone();
                Reward::Model(if incremental {
                    RewardScorer::new(rm.clone(), tokenizer, user)
                } else {
                    RewardScorer::full(rm.clone(), tokenizer, user)
                })
            }
            Kind::Remote(url) => {
                let remote = RemoteScorer::new(url, text.tokenizer.clone(), user)
                    .with_context(|| format!("--reward-url {url}"))?;
                Reward::Remote(if incremental { remote } else { remote.stateless() })
            }
        })
    }
}

/// Every reward the CLI offers, as one [`Scorer`] type.
#[derive(Debug)]
pub enum Reward {
    Judge(JudgeScorer),
    /// The self-judge and the loan it borrows from (the decoder lends to it).
    SelfJudge(SelfJudgeScorer, KvShare),
    Likelihood(LikelihoodScorer),
    Model(RewardScorer),
    Remote(RemoteScorer),
    WgpuJudge(WgpuJudgeScorer),
    WgpuLikelihood(WgpuLikelihoodScorer),
}

impl Reward {
    /// The K/V loan a decoder should lend through, for a reward that reads the decoder's K/V.
    pub fn kv_share(&self) -> Option<&KvShare> {
        match self {
            Reward::SelfJudge(_, share) => Some(share),
            _ => None,
        }
    }
}

impl Scorer for Reward {
    async fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        match self {
            Reward::Judge(s) => s.score(prompt, responses).await,
            Reward::SelfJudge(s, _) => s.score(prompt, responses).await,
            Reward::Likelihood(s) => s.score(prompt, responses).await,
            Reward::Model(s) => s.score(prompt, responses).await,
            Reward::Remote(s) => s.score(prompt, responses).await,
            Reward::WgpuJudge(s) => s.score(prompt, responses).await,
            Reward::WgpuLikelihood(s) => s.score(prompt, responses).await,
        }
    }

    async fn score_partial(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        match self {
            Reward::Judge(s) => s.score_partial(prompt, responses).await,
            Reward::SelfJudge(s, _) => s.score_partial(prompt, responses).await,
            Reward::Likelihood(s) => s.score_partial(prompt, responses).await,
            Reward::Model(s) => s.score_partial(prompt, responses).await,
            Reward::Remote(s) => s.score_partial(prompt, responses).await,
            Reward::WgpuJudge(s) => s.score_partial(prompt, responses).await,
            Reward::WgpuLikelihood(s) => s.score_partial(prompt, responses).await,
        }
    }

    fn fork(&mut self, children: &[(u32, u32)]) {
        match self {
            Reward::Judge(s) => s.fork(children),
            Reward::SelfJudge(s, _) => s.fork(children),
            Reward::Likelihood(s) => s.fork(children),
            Reward::Model(s) => s.fork(children),
            Reward::Remote(s) => s.fork(children),
            Reward::WgpuJudge(s) => s.fork(children),
            Reward::WgpuLikelihood(s) => s.fork(children),
        }
    }

    fn release(&mut self, rows: &[u32]) {
        match self {
            Reward::Judge(s) => s.release(rows),
            Reward::SelfJudge(s, _) => s.release(rows),
            Reward::Likelihood(s) => s.release(rows),
            Reward::Model(s) => s.release(rows),
            Reward::Remote(s) => s.release(rows),
            Reward::WgpuJudge(s) => s.release(rows),
            Reward::WgpuLikelihood(s) => s.release(rows),
        }
    }

    fn eager(&self) -> bool {
        match self {
            Reward::SelfJudge(s, _) => s.eager(),
            _ => false,
        }
    }
}
