//! Activation statistics: the FP32 model run by tract on the CPU with the
//! tensors to be quantized exposed as its outputs.

use std::collections::HashMap;

use tract_onnx::prelude::*;

use crate::errors::Cause;

/// Why the FP32 model cannot be run for statistics.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// tract cannot read it.
    #[error("not a loadable ONNX model")]
    Load(#[source] Cause),
    /// Its input cannot be set to the preprocessed size.
    #[error("its input cannot take {0:?}")]
    Input([usize; 4], #[source] Cause),
    /// A tensor to watch is not in the graph.
    #[error("tensor {0:?} is not in the graph tract loaded")]
    MissingTensor(String),
    /// tract cannot type, optimise or plan it.
    #[error("tract cannot prepare the model")]
    Prepare(#[source] Cause),
    /// A run failed.
    #[error("inference failed")]
    Run(#[source] Cause),
    /// A watched output is missing or not float.
    #[error("output {0} missing or not float")]
    Output(usize),
}

/// What [`ActivationProbe::run`] hands each probed tensor to: its index,
/// shape and values.
pub type Seen<'a> = dyn FnMut(usize, &[usize], &[f32]) + 'a;

/// `onnx` as tract reads it, its input set to `[1, 3, height, width]`
/// f32, and that shape.
fn read_for_input(
    onnx: &[u8],
    (width, height): (usize, usize),
) -> Result<(InferenceModel, [usize; 4]), ProbeError> {
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut &*onnx)
        .map_err(|e| ProbeError::Load(e.into()))?;
    let input_shape = [1, 3, height, width];
    model
        .set_input_fact(0, f32::fact(input_shape).into())
        .map_err(|e| ProbeError::Input(input_shape, e.into()))?;
    Ok((model, input_shape))
}

/// The shape of every tensor of `onnx` that tract can size for a `[1, 3,
/// height, width]` input, by ONNX name. Not the probe's: its model is cut
/// at the tensors it watches, which leaves out the head's last Convs.
pub fn tensor_shapes(
    onnx: &[u8],
    (width, height): (usize, usize),
) -> Result<HashMap<String, Vec<usize>>, ProbeError> {
    let (model, _) = read_for_input(onnx, (width, height))?;
    let typed = model
        .into_typed()
        .map_err(|e| ProbeError::Prepare(e.into()))?;
    Ok(typed
        .outlet_labels
        .iter()
        .filter_map(|(outlet, label)| {
            let fact = typed.outlet_fact(*outlet).ok()?;
            Some((label.clone(), fact.shape.as_concrete()?.to_vec()))
        })
        .collect())
}

/// The FP32 model, made runnable with the chosen tensors as its outputs.
pub struct ActivationProbe {
    plan: Arc<TypedRunnableModel>,
    input_shape: [usize; 4],
    /// For each probed tensor: the plan's output index, or `None` when it
    /// is the image input itself.
    sources: Vec<Option<usize>>,
    ranks: HashMap<String, usize>,
}

impl ActivationProbe {
    /// Prepares `onnx` for a `[1, 3, height, width]` input, exposing
    /// `tensors` (by ONNX name).
    pub fn new(
        onnx: &[u8],
        (width, height): (usize, usize),
        tensors: &[String],
    ) -> Result<ActivationProbe, ProbeError> {
        let (mut model, input_shape) = read_for_input(onnx, (width, height))?;
        let input_name = model.node(model.inputs[0].node).name.clone();
        let mut outlets = Vec::new();
        let mut sources = Vec::with_capacity(tensors.len());
        for t in tensors {
            if *t == input_name {
                sources.push(None);
                continue;
            }
            let outlet = model
                .find_outlet_label(t)
                .ok_or_else(|| ProbeError::MissingTensor(t.clone()))?;
            sources.push(Some(outlets.len()));
            outlets.push(outlet);
        }
        let prepare = |e: TractError| ProbeError::Prepare(e.into());
        model.select_output_outlets(&outlets).map_err(prepare)?;
        let typed = model.into_typed().map_err(prepare)?;
        let ranks = typed
            .outlet_labels
            .iter()
            .filter_map(|(outlet, label)| {
                let fact = typed.outlet_fact(*outlet).ok()?;
                Some((label.clone(), fact.rank()))
            })
            .collect();
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(prepare)?;
        Ok(ActivationProbe {
            plan,
            input_shape,
            sources,
            ranks,
        })
    }

    /// Ranks of the graph's tensors, by name, as tract inferred them.
    pub fn ranks(&self) -> &HashMap<String, usize> {
        &self.ranks
    }

    /// Runs one preprocessed CHW image and hands every probed tensor's
    /// shape and values to `seen(index, shape, values)`, in the order they
    /// were given.
    pub fn run(&self, input: &[f32], seen: &mut Seen<'_>) -> Result<(), ProbeError> {
        let probed = self.outputs(input)?;
        for index in 0..self.sources.len() {
            let (shape, values) = probed.get(index)?;
            seen(index, shape, values);
        }
        Ok(())
    }

    /// Runs one preprocessed CHW image and answers every probed tensor at
    /// once, for work shared between threads ([`Probed`] is `Sync`).
    pub fn outputs<'a>(&'a self, input: &'a [f32]) -> Result<Probed<'a>, ProbeError> {
        let run = |e: TractError| ProbeError::Run(e.into());
        let tensor = Tensor::from_shape(&self.input_shape, input).map_err(run)?;
        let outputs = self.plan.run(tvec!(tensor.into_tvalue())).map_err(run)?;
        // tract's values are shared tensors that may cross threads: a float
        // output is kept as it is, another cast once.
        let outputs = outputs
            .into_iter()
            .enumerate()
            .map(|(i, value)| {
                if value.datum_type() == f32::datum_type() {
                    return Ok(value);
                }
                let cast = value.cast_to::<f32>().map_err(|_| ProbeError::Output(i))?;
                Ok(cast.into_owned().into_tvalue())
            })
            .collect::<Result<Vec<TValue>, ProbeError>>()?;
        Ok(Probed {
            probe: self,
            input,
            outputs,
        })
    }
}

/// One image's probed tensors ([`ActivationProbe::outputs`]).
pub struct Probed<'a> {
    probe: &'a ActivationProbe,
    input: &'a [f32],
    outputs: Vec<TValue>,
}

impl Probed<'_> {
    /// The shape and values of the probed tensor at `index` (in the order
    /// the probe was given them).
    pub fn get(&self, index: usize) -> Result<(&[usize], &[f32]), ProbeError> {
        match self.probe.sources.get(index) {
            Some(None) => Ok((&self.probe.input_shape, self.input)),
            Some(Some(i)) => {
                let missing = || ProbeError::Output(*i);
                let value = self.outputs.get(*i).ok_or_else(missing)?;
                let plain = value.try_as_plain_ram().map_err(|_| missing())?;
                Ok((
                    value.shape(),
                    plain.as_slice::<f32>().map_err(|_| missing())?,
                ))
            }
            None => Err(ProbeError::Output(index)),
        }
    }
}
