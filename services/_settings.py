"""Typed settings for every service: ``RLAIF_*`` environment variables, or a ``.env``-style file.

A *profile* fills in the model and learning knobs that were not set explicitly: ``tiny`` (random 2-layer
models, for plumbing and CI) or ``default`` (SmolLM2-135M-Instruct student, real judge).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams import KafkaConfig, Topics

Profile = Literal["tiny", "default"]

_DATA = resources.files("services") / "data"

PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "student_model": "tiny-llama",
        "judge_model": "tiny-judge",
        "group_size": 4,
        "groups_per_step": 2,
        "max_new_tokens": 12,
        "learning_rate": 1e-3,
        "push_every": 1,
        "lora": False,
        "eval_every": 2,
        "eval_prompts": 4,
        "judge_concurrency": 8,
        "max_staleness": 8,
    },
    "default": {
        "student_model": "smollm2-135m-instruct",
        "judge_model": "smollm2-135m-instruct",
        "group_size": 4,
        "groups_per_step": 4,
        "max_new_tokens": 40,
        # 1e-3 decaying to 2e-4 over 60 steps; a 30-minute CPU run takes 71-88 (pilots: docs/algorithm.md)
        "learning_rate": 1e-3,
        "lr_decay_steps": 60,
        "lr_min_ratio": 0.2,
        "push_every": 1,
        "lora": True,
        # on the MLP too: three 30-minute runs gained +0.08-0.14 (mean 0.117), attention-only +0.05-0.13 (0.082)
        "lora_targets": "all",
        # two updates per batch: the clip never bound with one (clip_frac 0 at 117 of 128 steps); 30-minute
        # runs gained +0.139 and +0.163 with two, +0.07-0.10 with one since the generator fix (docs/algorithm.md)
        "ppo_epochs": 2,
        "eval_every": 5,
        "eval_prompts": 16,
        "judge_concurrency": 4,
        "max_staleness": 4,
    },
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLAIF_", env_file=os.environ.get("RLAIF_ENV_FILE"), extra="ignore")

    profile: Profile = "default"
    run_dir: Path = Path("runs/latest")
    cache_dir: Path = Path(".cache/rlaif")
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    partitions: int = Field(default=2, ge=1)

    triton_url: str = "127.0.0.1:8001"  # gRPC endpoint of Triton
    triton_ssl: bool = False
    triton_root_certs: Path | None = None
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    # a CPU judge queues requests behind big batches; a short deadline would only re-send work it still does
    triton_timeout_s: float = 300.0
    triton_threads: int = Field(default=2, ge=1)
    judge_render: Literal["plain", "chat"] = "plain"
    # compute token prefixes shared by rows of one judge batch once; unset = on a CPU only (see LlmJudge)
    judge_share_prefixes: bool | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    metrics_port: int | None = None  # Prometheus /metrics; None = off, 0 = a free port
    metrics_host: str = "127.0.0.1"

    constitution: Path = Path(str(_DATA / "constitution.yaml"))
    prompts: Path = Path(str(_DATA / "prompts.jsonl"))
    heads_data: Path | None = None  # labelled set the principle heads are trained on; None = the shipped one
    # what the principle heads read: the judge LM's hidden states after ``head_layer`` layers (averaged over
    # the conversation and over the response), or all-MiniLM-L6-v2 sentence embeddings (the heads' first
    # encoder; less accurate)
    head_encoder: Literal["judge-lm", "minilm"] = "judge-lm"
    head_layer: int = Field(default=20, ge=1)

    service_id: str = ""
    torch_threads: int = Field(default=1, ge=1)
    seed: int = 0

    # profile-dependent knobs (None = take the profile's value)
    student_model: str = ""
    judge_model: str = ""
    group_size: int = Field(default=4, ge=2)
    groups_per_step: int = Field(default=2, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    learning_rate: float = Field(default=1e-4, gt=0)
    push_every: int = Field(default=1, ge=1)
    lora: bool = True
    lora_rank: int = 8
    # which projections carry the adapter: attention (q,k,v,o) or all (+ the MLP's gate, up, down); the same
    # Literal as services._models.LoraTargets, spelled again so the settings do not import torch
    lora_targets: Literal["attention", "all"] = "attention"
    # the adapter in the top N decoder layers only (0 = all): the learner then runs the layers below it once a
    # step (the reference pass) and replays them in its updates (services._frozen_prefix)
    lora_layers: int = Field(default=0, ge=0)
    eval_every: int = Field(default=5, ge=1)
    eval_prompts: int = Field(default=8, ge=0)
    judge_concurrency: int = Field(default=8, ge=1)
    max_staleness: int = Field(default=4, ge=0)

    # learner
    max_steps: int = 0  # 0 = run until stopped
    kl_coef: float = 0.05
    clip_eps: float = 0.2
    max_importance_ratio: float = 5.0
    grad_accum: int = Field(default=1, ge=1)
    # optimizer updates per step on the same rollouts (PPO's epochs); the clip bounds how far the later ones go
    ppo_epochs: int = Field(default=1, ge=1)
    # each epoch split into this many updates on disjoint whole groups (PPO's minibatches; same compute)
    ppo_minibatches: int = Field(default=1, ge=1)
    # the PPO clip's centre: the behaviour policy (the generator's version), or the policy as the step found it
    # ("proximal", decoupled PPO: staleness corrected by a separate importance weight capped at
    # max_importance_ratio), so rollouts a version or two old still move the policy a full clip range
    ppo_clip_against: Literal["behaviour", "proximal"] = "behaviour"
    max_grad_norm: float = 1.0
    # divide group-centred rewards by each group's std ("group", GRPO) or by the step's pooled one ("step")
    advantage_scale: Literal["group", "step"] = "group"
    # the divisor of the advantages is at least this: a group spread less (judge noise) is not stretched to +-1
    advantage_std_floor: float = Field(default=0.0, ge=0)
    # cosine decay of learning_rate to learning_rate * lr_min_ratio over lr_decay_steps (0 = constant)
    lr_decay_steps: int = Field(default=0, ge=0)
    lr_min_ratio: float = Field(default=0.1, ge=0, le=1)
    # completions of one prompt share its forward pass (fewer tokens) or the step is one padded batch (fewer
    # forwards); unset = share on a CPU with torch_threads <= 2 only (``share_prompts_by_default``)
    learner_share_prompts: bool | None = None
    checkpoint_every: int = Field(default=10, ge=1)
    # weights up to this size also travel inline on the policy topic (no shared disk needed); bigger ones, and
    # all of them at 0, are read by the generators from the policy store by URI (a shared disk or volume)
    weights_inline_max_bytes: int = Field(default=32 * 1024 * 1024, ge=0)
    # A pushed policy file is fsynced before it is announced, so no power cut can lose an announced version.
    # False = announce it once it is renamed into place and fsync while the announcement travels (the
    # checkpoint still waits for the fsync; see VisibleFile): measured 16% faster for full weights, no
    # difference for the LoRA adapter, whose ~3 ms fsync is lost in the Kafka hop (docs/benchmarks.md)
    weights_durable_before_announce: bool = True
    # How long a generator's fetch on the policy topic may wait at the broker. Tansu does not always answer a
    # waiting fetch when records arrive, so this bounds how late a generator sees a new version; every
    # follower then polls this often while idle. Measured with 2 idle followers on Tansu: 50 ms costs ~3% of a
    # core at the broker (hop p50 7 ms), 5 ms ~10% (hop p50 3 ms). Apache Kafka answers at once at any value.
    policy_fetch_wait_ms: int = Field(default=50, ge=1, le=500)
    # The same wait for the readers that only watch the run (archive and analytics consumers, the supervisor's
    # monitor, the dashboard), and for the feeder's view of the learner's steps: an idle reader polls this
    # often, and each poll costs Tansu ~1.4 ms of CPU. At 50 ms these four readers sent ~80 fetches a second
    # (0.13 cores at the broker on a 2-core box); a record seen up to this much later changes nothing for them.
    observer_fetch_wait_ms: int = Field(default=500, ge=1, le=5000)
    feeder_fetch_wait_ms: int = Field(default=100, ge=1, le=5000)
    group_timeout_s: float = 120.0

    # generator / feeder
    max_prompt_lag: int = Field(default=8, ge=1)  # prompts published but not yet taken by a generator
    # a generator samples together what is waiting, up to this many prompts' worth of rows (generate_batch x
    # group_size: 4 train prompts, or 16 greedy eval prompts of one row each)
    generate_batch: int = Field(default=4, ge=1)
    # after the first prompt arrives, how long a generator waits for more to fill the batch: the feeder
    # publishes a step's prompts one by one, and a lone prompt sampled alone costs ~60% of a full batch
    generate_linger_ms: int = Field(default=250, ge=0, le=5000)

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        profile = data.get("profile") or os.environ.get("RLAIF_PROFILE", "default")
        for key, value in PROFILES.get(str(profile), {}).items():
            if key not in data and f"RLAIF_{key.upper()}" not in os.environ:
                data[key] = value
        return data

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.kafka.topic_prefix, partitions=self.partitions)

    def env(self) -> dict[str, str]:
        """These settings as RLAIF_* variables, for the child processes of the supervisor."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(exclude={"kafka"}).items():
            if value is not None:
                out[f"RLAIF_{name.upper()}"] = str(value)
        for name, value in self.kafka.model_dump().items():
            if value is None:
                continue
            secret = self.kafka.sasl_password
            text = secret.get_secret_value() if name == "sasl_password" and secret else str(value)
            out[f"RLAIF_KAFKA_{name.upper()}"] = text
        return out
