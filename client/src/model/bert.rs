//! BERT (all-MiniLM-L6-v2) in tch, as functions over `nn::Path` taking a small `Copy`
//! config. Tensor names match the Hugging Face checkpoint without a `bert.` prefix, so
//! `VarStore::load` fills the frozen base from `model.safetensors` directly.
//!
//! The attention query and value projections take an optional low-rank update (LoRA),
//! supplied by the caller per layer; everything else is the plain pretrained network.

use tch::{Kind, Tensor, nn, nn::Module};

/// The shape of a BERT encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    pub intermediate: i64,
    pub max_positions: i64,
    pub type_vocab_size: i64,
}

impl BertConfig {
    /// all-MiniLM-L6-v2.
    pub const MINILM_L6: BertConfig = BertConfig {
        vocab_size: 30_522,
        hidden: 384,
        layers: 6,
        heads: 12,
        intermediate: 1536,
        max_positions: 512,
        type_vocab_size: 2,
    };
}

const LAYER_NORM_EPS: f64 = 1e-12;

fn layer_norm(p: nn::Path, hidden: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![hidden], nn::LayerNormConfig { eps: LAYER_NORM_EPS, ..Default::default() })
}

/// The low-rank update of one projection: `x ↦ scale · (x Aᵀ) Bᵀ`.
pub trait LowRank {
    fn delta(&self, layer: usize, target: Target, xs: &Tensor) -> Option<Tensor>;
}

/// Which projection of a layer's self-attention an adapter modifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Query,
    Value,
}

impl Target {
    pub fn module_name(self) -> &'static str {
        match self {
            Target::Query => "query",
            Target::Value => "value",
        }
    }
}

#[derive(Debug)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attention_out: nn::Linear,
    attention_norm: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_norm: nn::LayerNorm,
}

fn layer(p: nn::Path, c: BertConfig) -> Layer {
    let attention = &p / "attention";
    let self_attention = &attention / "self";
    let linear = |p: nn::Path, i, o| nn::linear(p, i, o, Default::default());
    Layer {
        query: linear(&self_attention / "query", c.hidden, c.hidden),
        key: linear(&self_attention / "key", c.hidden, c.hidden),
        value: linear(&self_attention / "value", c.hidden, c.hidden),
        attention_out: linear(&attention / "output" / "dense", c.hidden, c.hidden),
        attention_norm: layer_norm(&attention / "output" / "LayerNorm", c.hidden),
        intermediate: linear(&p / "intermediate" / "dense", c.hidden, c.intermediate),
        output: linear(&p / "output" / "dense", c.intermediate, c.hidden),
        output_norm: layer_norm(&p / "output" / "LayerNorm", c.hidden),
    }
}

/// The pretrained encoder (embeddings and transformer layers; no pooler).
#[derive(Debug)]
pub struct Bert {
    config: BertConfig,
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    embedding_norm: nn::LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    pub fn new(p: &nn::Path, c: BertConfig) -> Self {
        let e = p / "embeddings";
        let embedding = |p: nn::Path, n, d| nn::embedding(p, n, d, Default::default());
        Self {
            config: c,
            word: embedding(&e / "word_embeddings", c.vocab_size, c.hidden),
            position: embedding(&e / "position_embeddings", c.max_positions, c.hidden),
            token_type: embedding(&e / "token_type_embeddings", c.type_vocab_size, c.hidden),
            embedding_norm: layer_norm(&e / "LayerNorm", c.hidden),
            layers: (0..c.layers).map(|i| layer(p / "encoder" / "layer" / i, c)).collect(),
        }
    }

    pub fn config(&self) -> BertConfig {
        self.config
    }

    /// Hidden states `[batch, tokens, hidden]` for token ids and attention mask (both
    /// `[batch, tokens]`, int64), with `adapters` adding their low-rank updates.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, adapters: Option<&dyn LowRank>) -> Tensor {
        let (batch, tokens) = ids.size2().expect("ids are [batch, tokens]");
        let positions = Tensor::arange(tokens, (Kind::Int64, ids.device())).unsqueeze(0);
        let xs = self.word.forward(ids)
            + self.position.forward(&positions)
            + self.token_type.forward(&ids.zeros_like());
        let mut xs = self.embedding_norm.forward(&xs);
        // Additive mask: 0 where attended, a large negative number on padding.
        let bias = ((mask.to_kind(xs.kind()) - 1.0) * 1e9).view([batch, 1, 1, tokens]);
        let (heads, head_dim) = (self.config.heads, self.config.hidden / self.config.heads);
        let split = |t: Tensor| t.view([batch, tokens, heads, head_dim]).transpose(1, 2);
        for (i, l) in self.layers.iter().enumerate() {
            let project = |linear: &nn::Linear, target| {
                let base = linear.forward(&xs);
                match adapters.and_then(|a| a.delta(i, target, &xs)) {
                    Some(delta) => base + delta,
                    None => base,
                }
            };
            let q = split(project(&l.query, Target::Query));
            let k = split(l.key.forward(&xs));
            let v = split(project(&l.value, Target::Value));
            // Fused softmax(q kᵀ / √d + bias) v, as transformers' default "sdpa" attention.
            let context =
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, None, false)
                    .transpose(1, 2)
                    .contiguous()
                    .view([batch, tokens, self.config.hidden]);
            let attended = l.attention_norm.forward(&(l.attention_out.forward(&context) + &xs));
            let ffn = l.output.forward(&l.intermediate.forward(&attended).gelu("none"));
            xs = l.output_norm.forward(&(ffn + attended));
        }
        xs
    }
}

/// Mean over the tokens the mask keeps, then L2 normalisation: sentence embeddings.
pub fn mean_pool_normalise(hidden: &Tensor, mask: &Tensor) -> Tensor {
    let mask = mask.to_kind(hidden.kind()).unsqueeze(-1);
    let summed = (hidden * &mask).sum_dim_intlist(1, false, hidden.kind());
    let counts = mask.sum_dim_intlist(1, false, hidden.kind()).clamp_min(1e-9);
    let mean = summed / counts;
    let norm = mean.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12);
    mean / norm
}
