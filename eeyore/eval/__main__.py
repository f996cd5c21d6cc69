"""`python -m eeyore.eval`: evaluate a simulated client on profile adherence and linguistic
authenticity against any OpenAI-compatible endpoint (the project's server, vLLM, OpenAI).

The reference command lines work unchanged, e.g.
  python -m eeyore.eval --experiment-name=eeyore --experiment-model=M --base-url=http://127.0.0.1:6416/v1 --api-key=K
  python -m eeyore.eval --experiment-name=patient-psi --experiment-model=gpt-4o-2024-08-06 --base-url=https://api.openai.com/v1 --api-key=K --temperature=0.8 --top-p=1.0

Results: OUTPUT_DIR/RUN_NAME/results.json (every transcript, judge answer, score and metric);
finished sessions are cached beside it, so rerunning the same command resumes an interrupted run.
Compare runs with `python -m eeyore.eval.report RUN_DIR...`.
"""
from __future__ import annotations

import argparse
import sys

from eeyore.eval.baselines import EXPERIMENTS, REFERENCE_SAMPLING
from eeyore.serve.client import EndpointError
from eeyore.profile import ProfileError
from eeyore.eval.runner import CATEGORIES, EvalConfig, run


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m eeyore.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("simulated client")
    g.add_argument("--experiment-name", default="eeyore", choices=EXPERIMENTS,
                   help="eeyore: the model prompted with the profile; roleplay-doh / patient-psi: the prompting baselines")
    g.add_argument("--experiment-model", default="eeyore", help="model name sent to the endpoint (default: eeyore)")
    g.add_argument("--base-url", default="http://127.0.0.1:6416/v1", help="OpenAI-compatible base URL of the client model")
    g.add_argument("--api-key", default="EMPTY", help="API key of the client endpoint (also the judge's when none is given)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the reference's, " +
                   ", ".join(f"{k} {v[0]}" for k, v in REFERENCE_SAMPLING.items()) + ")")
    g.add_argument("--top-p", type=float, default=None, help="top-p (default: the reference's, " +
                   ", ".join(f"{k} {v[1]}" for k, v in REFERENCE_SAMPLING.items()) + ")")
    g.add_argument("--max-tokens", type=int, default=4096, help="max tokens per client reply (default 4096)")
    g.add_argument("--prompt-style", default="eval", choices=("eval", "train"),
                   help="system prompt variant: the reference evaluation's (eval, default) or the training data's (train)")
    g = p.add_argument_group("judge")
    g.add_argument("--judger-model", default="gpt-4o-2024-08-06", help="judge model (default gpt-4o-2024-08-06)")
    g.add_argument("--judger-base-url", default="https://api.openai.com/v1", help="judge endpoint (default OpenAI)")
    g.add_argument("--judger-api-key", "--openai-api-key", dest="judger_api_key", default=None,
                   help="judge API key (default: $OPENAI_API_KEY, else --api-key)")
    g.add_argument("--judger-max-tokens", type=int, default=256, help="max tokens per judge answer (default 256)")
    g.add_argument("--judger-temperature", type=float, default=0.0, help="judge temperature (default 0)")
    g.add_argument("--judge-attempts", type=int, default=3,
                   help="asks per judgement while the answer holds no 1-5 score; then it is recorded as missing (default 3)")
    g = p.add_argument_group("profiles and run")
    g.add_argument("--profiles", "--profile-path", dest="profiles", default=None,
                   help="profiles JSON (default: the sample profiles shipped with eeyore)")
    g.add_argument("--start-index", type=int, default=0, help="first profile to evaluate (default 0)")
    g.add_argument("--end-index", type=int, default=None, help="stop before this profile (default: all)")
    g.add_argument("--max-traits", type=int, default=None, help="interview at most this many traits per profile (default: all)")
    g.add_argument("--concurrency", type=int, default=16, help="sessions run at once (default 16)")
    g.add_argument("--output-dir", default="runs/eval",
                   help="results go to OUTPUT_DIR/RUN_NAME/results.json, with a resumable cache beside it (default runs/eval)")
    g.add_argument("--run-name", default=None,
                   help="the folder under OUTPUT_DIR (default: EXPERIMENT-NAME_EXPERIMENT-MODEL, every run of "
                        "characters other than letters, digits, '.' and '-' in the model name replaced by one '-', "
                        "e.g. eeyore_gpt-4o-2024-08-06 or patient-psi_org-model)")
    g = p.add_argument_group("authenticity")
    g.add_argument("--free-turns", type=int, default=0,
                   help="also hold a free conversation of this many client turns per profile with a counsellor LLM (default 0: off)")
    g.add_argument("--counsellor-model", default=None, help="counsellor model (default: the judge model)")
    g.add_argument("--counsellor-base-url", default=None, help="counsellor endpoint (default: the judge endpoint)")
    g.add_argument("--counsellor-api-key", default=None, help="counsellor API key (default: the judge key)")
    g.add_argument("--judge-realism", action="store_true", help="have the judge rate each free conversation's realism 1-5")
    g.add_argument("--reference", default=None,
                   help="real-client reference: a profiles file with real conversations or a saved reference "
                        "(default: statistics of the 12 real test conversations, shipped)")
    a = p.parse_args(argv)
    if a.judge_realism and a.free_turns < 1:
        p.error("--judge-realism rates the free conversations: give --free-turns K (K >= 1)")
    if a.concurrency < 1:
        p.error("--concurrency must be at least 1")
    return EvalConfig(
        experiment=a.experiment_name, model=a.experiment_model, base_url=a.base_url, api_key=a.api_key,
        temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, prompt_style=a.prompt_style,
        judge_model=a.judger_model, judge_base_url=a.judger_base_url, judge_api_key=a.judger_api_key,
        judge_max_tokens=a.judger_max_tokens, judge_temperature=a.judger_temperature, judge_attempts=a.judge_attempts,
        profiles=a.profiles, start_index=a.start_index, end_index=a.end_index, max_traits=a.max_traits,
        concurrency=a.concurrency, output_dir=a.output_dir, run_name=a.run_name, free_turns=a.free_turns,
        counsellor_model=a.counsellor_model, counsellor_base_url=a.counsellor_base_url,
        counsellor_api_key=a.counsellor_api_key, judge_realism=a.judge_realism, reference=a.reference,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        results = run(cfg)
    except (ProfileError, FileNotFoundError, EndpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cat in (*CATEGORIES, "all"):
        s = results["adherence"][cat]
        if s["n"] or s["missing"]:
            mean = "n/a" if s["mean"] is None else f"{s['mean']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]"
            print(f"adherence {cat:<10} {mean}  (n={s['n']}, missing={s['missing']})")
    for source in ("interview", "free"):
        if source in results["authenticity"]:
            score = results["authenticity"][source]["score"]
            print(f"authenticity ({source}): " + ("n/a (no client turns)" if score is None else f"{score:.1f} / 100"))
    realism = results.get("realism")
    if realism is not None:
        mean = "n/a" if realism["mean"] is None else f"{realism['mean']:.2f} [{realism['ci'][0]:.2f}, {realism['ci'][1]:.2f}]"
        print(f"realism {mean}  (n={realism['n']}, missing={realism['missing']})")
    print(f"results: {cfg.run_dir / 'results.json'}")
    failed = results["sessions"]["failed"]
    if failed:
        print(f"{failed} sessions failed (see 'failures'); rerun the same command to retry only those", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
