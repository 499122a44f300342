"""Quality metrics: FID and KID on Inception features, the FID Inception-v3, per-member evaluation."""
from .evaluate import Evaluator, evaluate_members, extract_features, format_table, quantize_8bit, style_codes
from .fid import KID, fid_from_features, frechet_distance, gaussian_stats, kid_from_features, mmd2_unbiased
from .inception import (FEATURE_DIM, FID_WEIGHTS_NAME, FID_WEIGHTS_URL, FIDInceptionV3, InceptionWeightsError,
                        load_inception)

__all__ = ["KID", "fid_from_features", "kid_from_features", "frechet_distance", "gaussian_stats", "mmd2_unbiased",
           "FIDInceptionV3", "load_inception", "InceptionWeightsError", "FID_WEIGHTS_URL", "FID_WEIGHTS_NAME",
           "FEATURE_DIM", "Evaluator", "evaluate_members", "extract_features", "format_table", "quantize_8bit",
           "style_codes"]
