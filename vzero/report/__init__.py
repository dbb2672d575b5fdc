"""`vzero report RUN_DIR`: one self-contained HTML page that shows what the gate saw during a run.

The page (index.html, every image embedded as a data URI: it opens from disk with no server, no network and no
script) plus the PNGs it shows, written to `--out` (default RUN_DIR/report):
- curves per step from metrics.jsonl: loss; gate weight mean / min / max and share at w_min; mean Δ and share of
  tokens with Δ > 0 (Δ = lp_pos - lp_neg: the teacher's support for a token with the evidence minus without it);
  rollout / teacher / learner tokens per second; weight push seconds; staleness; quarantined rows;
- histograms of gate weights and per-token Δ for a few steps, from trajectories/step_*.parquet;
- a gallery of prompts from chosen steps: the full image (evidence box drawn), the teacher's positive and negative
  views rebuilt with `vzero.views.views_for` from the run's config.yaml and the data file, the question, and every
  sampled response with its gate weight and its tokens coloured by Δ (decoded with the student's tokenizer);
- the run's config and software versions.

It reads a run in progress as well as a finished one (a half-written metrics line or a step file being written is
skipped with a note), and any engine or gate level. A missing optional piece (trajectories, data file, tokenizer,
versions) leaves a note on the page instead of failing; a directory that is not a run is a `UserError`.

Modules: `load` (what the run wrote), `gallery` (prompts, views, decoded tokens), `plots` (matplotlib PNGs),
`html` (the page), `build` (writes it all), `commands` (the CLI). Never reads the data's `answer` column.
"""

from vzero.report.build import build_report

__all__ = ["build_report"]
