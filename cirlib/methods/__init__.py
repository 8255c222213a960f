"""How each paper trains its networks: tiny-CLIP pretraining (pretrain), CLIP4Cir stage 1
(stage1) and Combiner training (combiner_training), with the contrastive losses they share (losses)."""
