"""Wanda++'s alpha against Wanda on SmolLM2, a quick protocol: calibration 4 x 512 C4 windows (seed 0),
the given sparsity, WikiText-2 perplexity on the first 8 windows of 512 tokens.

    python benchmarks/wandapp_alpha.py 0.01,0.5,2 0.6     # alphas, sparsity
"""

import copy
import os
import sys

import llmprune
from llmprune.config import CalibConfig, PruneConfig
from llmprune.evaluation.perplexity import evaluate_perplexity

DATA = os.environ.get("LLMPRUNE_DATA_DIR", "../shared/data")
model, tok = llmprune.load_model("smollm2-135m", dtype="float32")
calib = CalibConfig(dataset="c4", nsamples=4, seqlen=512, seed=0)
for method, alpha in [("wanda", None)] + [("wanda++", a) for a in map(float, sys.argv[1].split(","))]:
    m = copy.deepcopy(model)
    kw = {} if alpha is None else {"wandapp_alpha": alpha}
    config = PruneConfig(method=method, sparsity=float(sys.argv[2]), calib=calib, **kw)
    llmprune.prune(m, tok, config, data_dir=DATA, progress=False)
    r = evaluate_perplexity(m, tok, "wikitext2", 512, data_dir=DATA, max_windows=8)
    print(method, alpha, round(r.ppl, 3), flush=True)
