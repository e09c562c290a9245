"""Tiny network configurations shared by the tests (fast to build and run on the CPU)."""

#: DATPRL-Restormer with both pools, a few thousand parameters.
TINY = dict(type='DATPRLRestormer', dim=8, enc_blk_nums=[1, 1, 1], middle_blk_num=1, dec_blk_nums=[1, 1, 1],
            refine_blk_num=1, heads=[1, 2, 4, 8], domain_pool_size=6, degradation_pool_size=7, domain_prompt_dim=32,
            degradation_prompt_dim=32, domain_top_k=3, degradation_top_k=2, value_num_tokens=2)
#: The NAFNet-backbone variant at the same pool sizes.
TINY_NAF = dict(type='DATPRLNAFNet', width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1],
                domain_pool_size=6, degradation_pool_size=7, domain_prompt_dim=32, degradation_prompt_dim=32,
                domain_top_k=3, degradation_top_k=2, value_num_tokens=2)
