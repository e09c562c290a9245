"""Tiny network configurations shared by the tests (fast to build and run on the CPU)."""

#: The Restormer backbone of every tiny DATPRL network: one block per level, 8 channels at level 1.
TINY_BACKBONE = dict(dim=8, enc_blk_nums=[1, 1, 1], middle_blk_num=1, dec_blk_nums=[1, 1, 1], refine_blk_num=1)
#: DATPRL-Restormer with both pools, a few thousand parameters.
TINY = dict(type='DATPRLRestormer', **TINY_BACKBONE, heads=[1, 2, 4, 8], domain_pool_size=6, degradation_pool_size=7,
            domain_prompt_dim=32, degradation_prompt_dim=32, domain_top_k=3, degradation_top_k=2, value_num_tokens=2)
#: The NAFNet-backbone variant at the same pool sizes.
TINY_NAF = dict(type='DATPRLNAFNet', width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1],
                domain_pool_size=6, degradation_pool_size=7, domain_prompt_dim=32, degradation_prompt_dim=32,
                domain_top_k=3, degradation_top_k=2, value_num_tokens=2)
#: Smaller prompts (16 wide, pools of 4, one head per level): the network of the runner, training and benchmark tests.
SMALL_PROMPTS = dict(type='DATPRLRestormer', **TINY_BACKBONE, heads=[1, 1, 1, 1], domain_pool_size=4,
                     degradation_pool_size=4, domain_prompt_dim=16, degradation_prompt_dim=16, domain_top_k=2,
                     degradation_top_k=2, value_num_tokens=2)
