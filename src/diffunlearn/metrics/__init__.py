"""Evaluation metrics. `METRIC_HELP` is torch-free, for `diffunlearn ls metrics`."""

# the weight groups in which diagnostics.DistanceTracker measures distance and direction of travel:
# xattn and noxattn partition full; unlearned = the weights an unlearning changed
DISTANCE_GROUPS = ("xattn", "noxattn", "full", "unlearned")

METRIC_HELP = {
    "UA": "% of forget-prompt generations NOT classified as the forget concept (full template) [001]",
    "UA_partial": "UA on partial prompts ('an image in {style} style', 'an image of {object}')",
    "IRA": "% of retain-prompt generations classified correctly in the forget concept's domain [001]",
    "CRA": "% of retain-prompt generations classified correctly in the other domain [001]",
    "SFID": "min(100 * FID_original / FID_model, 100) on retain generations [001] App. B",
    "Total": "UA + IRA + CRA + SFID [001] App. B",
    "AR_MU_top1": "% of forget generations classified as the forget concept after unlearning [002]",
    "AR_MU_top3": "% of forget generations with the forget concept in the top 3 [002]",
    "AR_CL": "% of forget generations classified as the anchor/alternative concept [002]",
    "p_forget": "mean classifier probability of the forget concept on forget generations [004]",
    "entropy": "mean entropy of the classifier output on forget generations [004]",
    "FID": "Frechet distance of retain generations to held-out real images, evaluator features",
    "KID": "kernel inception distance on the same features (mean, std over subsets)",
    "precision": "k-NN manifold precision of retain generations (Kynkaanniemi et al. 2019)",
    "recall": "k-NN manifold recall of retain generations",
    "erase_FID": "FID of forget generations against the original model's from the same seeds [003] (higher: erased)",
    "preserve_FID": "FID of retain generations against the original model's from the same seeds [003] (lower: kept)",
    "erase_ACC": "[003]'s erase ACC: AR_MU_top1, % of forget generations classified as the forget concept",
    "preserve_ACC": "[003]'s preserve ACC: IRA, % of in-domain retain generations classified correctly",
    "CLIP_score": "100 * max(cos(CLIP image, CLIP prompt), 0) on retain generations (clip evaluator) [004]",
    "CLIP_score_forget": "the CLIP score of forget generations with their own prompts (clip evaluator)",
    "nudenet": "NudeNet exposed body parts counted per class on forget / retain generations (nudenet) [003][004]",
    "weight_distance": "L2 distance and relative change of the trained weights from the original",
    "toward_unlearned": "direction of an attack's travel: cos(its move, the way back to the original) on the "
                        "weights unlearning changed; +1 straight back, 0 elsewhere, -1 away (also _xattn, _noxattn, "
                        "_full) [002] §IV",
    "cost": "wall time, peak memory (RSS), optimizer steps",
}
