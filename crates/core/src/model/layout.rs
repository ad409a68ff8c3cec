//! Which NanoDet export a model is, decided from its input and output
//! shapes (never from names: real exports carry misleading ones).

use std::fmt;

use crate::preprocess::{PreprocessSpec, ResizeMode};

/// The output arrangements NanoDet exports are known to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutKind {
    /// NanoDet-Plus: one `[1, N, C + 4·(reg_max+1)]` tensor, scores first,
    /// then DFL logits; four levels; cell centres at `x·s`; stretch resize.
    Plus,
    /// Legacy NanoDet: per level a `[N, C]` score and a `[N, 4·(reg_max+1)]`
    /// DFL tensor; centres at `(x+0.5)·s`; letterbox.
    Raw,
    /// Legacy NanoDet with the DFL integral done in the graph: per level a
    /// `[N, C]` score and a `[N, 4]` distance tensor in stride units.
    Integral,
    /// Single-output legacy export: `[1, N, 4 + C]`, distances in stride
    /// units first, then scores.
    Fused,
}

impl LayoutKind {
    /// Every known layout, for error messages and `--help`.
    pub const ALL: [LayoutKind; 4] = [
        LayoutKind::Plus,
        LayoutKind::Raw,
        LayoutKind::Integral,
        LayoutKind::Fused,
    ];

    /// Whether this is a legacy (pre-Plus) NanoDet layout, which the
    /// reference decodes with letterboxing, +0.5 centres and a per-level
    /// top-k before NMS.
    pub fn is_legacy(self) -> bool {
        !matches!(self, LayoutKind::Plus)
    }

    fn default_strides(self) -> &'static [usize] {
        match self {
            LayoutKind::Plus => &[8, 16, 32, 64],
            _ => &[8, 16, 32],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            LayoutKind::Plus => "plus: one [1,N,C+4*(reg_max+1)] output over strides 8/16/32/64",
            LayoutKind::Raw => "raw: per level [N,C] scores + [N,4*(reg_max+1)] DFL logits",
            LayoutKind::Integral => "integral: per level [N,C] scores + [N,4] distances",
            LayoutKind::Fused => "fused: one [1,N,4+C] output over strides 8/16/32",
        }
    }
}

impl fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayoutKind::Plus => "plus",
            LayoutKind::Raw => "raw",
            LayoutKind::Integral => "integral",
            LayoutKind::Fused => "fused",
        })
    }
}

impl std::str::FromStr for LayoutKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LayoutKind::ALL
            .into_iter()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| format!("unknown layout {s:?}; known: plus, raw, integral, fused"))
    }
}

/// What the loader would otherwise infer, for exports that break the
/// usual conventions. `None` means "infer".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayoutOverrides {
    /// Force a layout.
    pub layout: Option<LayoutKind>,
    /// Strides of the levels, finest first.
    pub strides: Option<Vec<usize>>,
    /// Offset of a cell's centre, in cells (0 for Plus, 0.5 for legacy).
    pub center_offset: Option<f32>,
    /// Resize mode (stretch for Plus, letterbox for legacy).
    pub resize: Option<ResizeMode>,
    /// DFL bins per side minus one (7 in every known export).
    pub reg_max: Option<usize>,
    /// Number of classes, when known from a class-name file.
    pub num_classes: Option<usize>,
}

impl LayoutOverrides {
    /// These overrides, with as many classes as `class_names` has where
    /// no count is set: a class-name file tells the count.
    pub fn counting<T>(&self, class_names: Option<&[T]>) -> LayoutOverrides {
        LayoutOverrides {
            num_classes: self.num_classes.or(class_names.map(<[T]>::len)),
            ..self.clone()
        }
    }
}

/// A named tensor shape, as a backend reports a model's input or outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorShape {
    /// Declared name (informative only: never used to pick a layout).
    pub name: String,
    /// Concrete dimensions.
    pub shape: Vec<usize>,
}

/// How box regression is encoded per prior.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoxEncoding {
    /// Four groups of `bins` logits: softmax, then expectation.
    Dfl {
        /// Bins per side (`reg_max + 1`).
        bins: usize,
    },
    /// Four distances in stride units.
    Distances,
}

impl BoxEncoding {
    /// Values per prior.
    pub fn width(self) -> usize {
        match self {
            BoxEncoding::Dfl { bins } => 4 * bins,
            BoxEncoding::Distances => 4,
        }
    }
}

/// Where the decoder finds scores and boxes among the model's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputMap {
    /// One `[N, K]` output with scores at `score_column..+C` and the box at
    /// `box_column..+box width`.
    Single {
        /// Output index.
        output: usize,
        /// First score column.
        score_column: usize,
        /// First box column.
        box_column: usize,
    },
    /// One score and one box output per level, finest level first.
    PerLevel {
        /// Output index of each level's scores.
        scores: Vec<usize>,
        /// Output index of each level's boxes.
        boxes: Vec<usize>,
    },
}

/// One feature-map level: its stride and grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Pixels per cell.
    pub stride: usize,
    /// Cells per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

impl Level {
    fn new(stride: usize, input_w: usize, input_h: usize) -> Level {
        Level {
            stride,
            width: input_w.div_ceil(stride),
            height: input_h.div_ceil(stride),
        }
    }

    /// Priors (cells) in this level.
    pub fn priors(&self) -> usize {
        self.width * self.height
    }
}

/// Everything needed to turn a model's raw outputs into boxes.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Which export this is.
    pub kind: LayoutKind,
    /// Input width.
    pub input_width: usize,
    /// Input height.
    pub input_height: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Box encoding.
    pub boxes: BoxEncoding,
    /// Levels, finest first.
    pub levels: Vec<Level>,
    /// Cell-centre offset in cells.
    pub center_offset: f32,
    /// Resize mode the model was trained with.
    pub resize: ResizeMode,
    /// Where scores and boxes are.
    pub outputs: OutputMap,
}

/// Why no layout fits a model.
#[derive(Debug, thiserror::Error)]
#[error(
    "{reason}; input {input:?}, outputs [{}]; known layouts: {}",
    .outputs.iter().map(|o| format!("{} {:?}", o.name, o.shape)).collect::<Vec<_>>().join(", "),
    LayoutKind::ALL.iter().map(|k| k.describe()).collect::<Vec<_>>().join("; ")
)]
pub struct LayoutError {
    /// What did not fit.
    pub reason: String,
    /// The model's input shape.
    pub input: Vec<usize>,
    /// The model's output shapes.
    pub outputs: Vec<TensorShape>,
}

/// Drops leading unit axes so `[1, N, K]` and `[N, K]` read the same.
fn rows_and_columns(shape: &[usize]) -> Option<(usize, usize)> {
    let mut dims = shape;
    while dims.len() > 2 && dims[0] == 1 {
        dims = &dims[1..];
    }
    match dims {
        [n, k] => Some((*n, *k)),
        _ => None,
    }
}

impl Layout {
    /// Picks the layout whose shapes match `input` (`[1, 3, H, W]`) and
    /// `outputs`, applying `overrides`.
    pub fn detect(
        input: &[usize],
        outputs: &[TensorShape],
        overrides: &LayoutOverrides,
    ) -> Result<Layout, LayoutError> {
        let fail = |reason: String| LayoutError {
            reason,
            input: input.to_vec(),
            outputs: outputs.to_vec(),
        };
        let (input_h, input_w) = match input {
            [_, 3, h, w] if *h > 0 && *w > 0 => (*h, *w),
            _ => return Err(fail("input is not a [N, 3, H, W] image tensor".into())),
        };
        let mut matrices = Vec::with_capacity(outputs.len());
        for o in outputs {
            let Some(rc) = rows_and_columns(&o.shape) else {
                return Err(fail(format!(
                    "output {} {:?} is not a [N, K] or [1, N, K] matrix",
                    o.name, o.shape
                )));
            };
            matrices.push(rc);
        }
        let reg_max = overrides.reg_max.unwrap_or(7);
        let dfl = BoxEncoding::Dfl { bins: reg_max + 1 };
        let levels_for = |strides: &[usize]| -> Vec<Level> {
            strides
                .iter()
                .map(|&s| Level::new(s, input_w, input_h))
                .collect()
        };
        let total = |levels: &[Level]| levels.iter().map(Level::priors).sum::<usize>();

        let (kind, num_classes, boxes, levels, map) = match matrices.as_slice() {
            [] => return Err(fail("the model has no outputs".into())),
            [(rows, columns)] => {
                let candidates: Vec<LayoutKind> = match overrides.layout {
                    Some(k) => vec![k],
                    None => vec![LayoutKind::Plus, LayoutKind::Fused],
                };
                // Plus: C scores, then the DFL logits from column C on.
                // With C known, the logits' width gives reg_max.
                let plus_dfl = match (overrides.reg_max, overrides.num_classes) {
                    (None, Some(n)) => columns
                        .checked_sub(n)
                        .filter(|w| *w > 4 && w.is_multiple_of(4))
                        .map_or(dfl, |w| BoxEncoding::Dfl { bins: w / 4 }),
                    _ => dfl,
                };
                let mut found = None;
                for kind in candidates {
                    let (boxes, score_column, box_column, classes) = match kind {
                        LayoutKind::Plus => (
                            plus_dfl,
                            0,
                            columns.saturating_sub(plus_dfl.width()),
                            columns.checked_sub(plus_dfl.width()),
                        ),
                        LayoutKind::Fused => (BoxEncoding::Distances, 4, 0, columns.checked_sub(4)),
                        other => {
                            return Err(fail(format!(
                                "layout {other} needs one score and one box output per level, the model has one output"
                            )));
                        }
                    };
                    let levels = levels_for(
                        overrides
                            .strides
                            .as_deref()
                            .unwrap_or(kind.default_strides()),
                    );
                    let classes_fit = match (classes, overrides.num_classes) {
                        (Some(c), Some(n)) => c == n,
                        (Some(c), None) => c > 0,
                        (None, _) => false,
                    };
                    if classes_fit && total(&levels) == *rows {
                        found = Some((
                            kind,
                            classes.unwrap_or(0),
                            boxes,
                            levels,
                            OutputMap::Single {
                                output: 0,
                                score_column,
                                box_column,
                            },
                        ));
                        break;
                    }
                }
                found.ok_or_else(|| {
                    fail(format!(
                        "one output of {rows} priors x {columns} values matches no single-output layout \
                         (at {input_w}x{input_h}, strides 8/16/32/64 give {} priors and 8/16/32 give {}; \
                         override with --layout/--strides/--classes if this export differs)",
                        total(&levels_for(&[8, 16, 32, 64])),
                        total(&levels_for(&[8, 16, 32])),
                    ))
                })?
            }
            _ => {
                Self::detect_per_level(&matrices, overrides, dfl, input_w, input_h).map_err(fail)?
            }
        };
        if let Some(n) = overrides.num_classes
            && n != num_classes
        {
            return Err(fail(format!(
                "the class-name list has {n} names but the model scores {num_classes} classes"
            )));
        }
        let legacy = kind.is_legacy();
        Ok(Layout {
            kind,
            input_width: input_w,
            input_height: input_h,
            num_classes,
            boxes,
            levels,
            center_offset: overrides
                .center_offset
                .unwrap_or(if legacy { 0.5 } else { 0.0 }),
            resize: overrides.resize.unwrap_or(if legacy {
                ResizeMode::Letterbox
            } else {
                ResizeMode::Stretch
            }),
            outputs: map,
        })
    }

    /// Pairs per-level score and box outputs by their prior count.
    fn detect_per_level(
        matrices: &[(usize, usize)],
        overrides: &LayoutOverrides,
        dfl: BoxEncoding,
        input_w: usize,
        input_h: usize,
    ) -> Result<(LayoutKind, usize, BoxEncoding, Vec<Level>, OutputMap), String> {
        // Group output indices by prior count, keeping declared order.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, (rows, _)) in matrices.iter().enumerate() {
            match groups.iter_mut().find(|(n, _)| n == rows) {
                Some((_, members)) => members.push(i),
                None => groups.push((*rows, vec![i])),
            }
        }
        if let Some((n, members)) = groups.iter().find(|(_, m)| m.len() != 2) {
            return Err(format!(
                "{} outputs have {n} priors; a per-level layout needs exactly one score and one box output per level",
                members.len()
            ));
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.0));

        let box_width_wanted = match overrides.layout {
            Some(LayoutKind::Integral) => Some(4),
            Some(LayoutKind::Raw) => Some(dfl.width()),
            Some(other) => {
                return Err(format!(
                    "layout {other} has one output, the model has {}",
                    matrices.len()
                ));
            }
            None => None,
        };
        let mut scores = Vec::new();
        let mut boxes = Vec::new();
        let mut encoding = None;
        let mut classes = None;
        for (_, members) in &groups {
            let (a, b) = (members[0], members[1]);
            let (ka, kb) = (matrices[a].1, matrices[b].1);
            // With the class count known, any other multiple of 4 is DFL
            // logits of some reg_max.
            let is_box = |k: usize| match box_width_wanted {
                Some(w) => k == w,
                None => {
                    k == 4
                        || k == dfl.width()
                        || (overrides.reg_max.is_none()
                            && overrides.num_classes.is_some_and(|n| n != k)
                            && k > 4
                            && k.is_multiple_of(4))
                }
            };
            let is_score = |k: usize| overrides.num_classes.is_none_or(|n| n == k);
            // Declared order breaks a tie (a 32-class model next to 32 DFL
            // logits): every known export lists scores first.
            let (s, bx) = if is_box(kb) && is_score(ka) {
                (a, b)
            } else if is_box(ka) && is_score(kb) {
                (b, a)
            } else {
                return Err(format!(
                    "outputs {a} ({ka} columns) and {b} ({kb} columns) share a level but neither is a box output \
                     of 4 distances or {} DFL logits",
                    dfl.width()
                ));
            };
            let this_encoding = match matrices[bx].1 {
                4 => BoxEncoding::Distances,
                k => BoxEncoding::Dfl { bins: k / 4 },
            };
            if encoding.is_some_and(|e| e != this_encoding)
                || classes.is_some_and(|c| c != matrices[s].1)
            {
                return Err("levels disagree on the number of classes or the box encoding".into());
            }
            encoding = Some(this_encoding);
            classes = Some(matrices[s].1);
            scores.push(s);
            boxes.push(bx);
        }
        let (Some(encoding), Some(classes)) = (encoding, classes) else {
            return Err("no levels found".into());
        };
        let levels: Vec<Level> = match &overrides.strides {
            Some(strides) => {
                if strides.len() != groups.len() {
                    return Err(format!(
                        "{} strides given for {} levels",
                        strides.len(),
                        groups.len()
                    ));
                }
                strides
                    .iter()
                    .map(|&s| Level::new(s, input_w, input_h))
                    .collect()
            }
            None => {
                let mut levels = Vec::new();
                for (n, _) in &groups {
                    let level = (0..8)
                        .map(|p| Level::new(1 << p, input_w, input_h))
                        .find(|l| l.priors() == *n)
                        .ok_or_else(|| {
                            format!(
                                "no power-of-two stride gives {n} priors at {input_w}x{input_h}"
                            )
                        })?;
                    levels.push(level);
                }
                levels
            }
        };
        for (level, (n, _)) in levels.iter().zip(&groups) {
            if level.priors() != *n {
                return Err(format!(
                    "stride {} gives {} priors, the output has {n}",
                    level.stride,
                    level.priors()
                ));
            }
        }
        let kind = match encoding {
            BoxEncoding::Distances => LayoutKind::Integral,
            BoxEncoding::Dfl { .. } => LayoutKind::Raw,
        };
        Ok((
            kind,
            classes,
            encoding,
            levels,
            OutputMap::PerLevel { scores, boxes },
        ))
    }

    /// Total priors over all levels.
    pub fn priors(&self) -> usize {
        self.levels.iter().map(Level::priors).sum()
    }

    /// NanoDet's preprocessing at this layout's input size and resize mode.
    pub fn preprocess_spec(&self) -> PreprocessSpec {
        PreprocessSpec::nanodet(self.input_width, self.input_height, self.resize)
    }
}

/// The layout [`Layout::detect`] finds for a square `side`×`side` input
/// and outputs of `shapes`, with no overrides: for tests of the code that
/// reads a layout.
#[cfg(test)]
pub(crate) fn square_layout(side: usize, shapes: &[&[usize]]) -> Layout {
    let outputs: Vec<TensorShape> = shapes
        .iter()
        .map(|s| TensorShape {
            name: String::new(),
            shape: s.to_vec(),
        })
        .collect();
    Layout::detect(&[1, 3, side, side], &outputs, &LayoutOverrides::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outs(shapes: &[&[usize]]) -> Vec<TensorShape> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| TensorShape {
                name: format!("out{i}"),
                shape: s.to_vec(),
            })
            .collect()
    }

    #[test]
    fn plus_320_and_416() {
        let l = Layout::detect(
            &[1, 3, 320, 320],
            &outs(&[&[1, 2125, 112]]),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(l.kind, LayoutKind::Plus);
        assert_eq!(l.num_classes, 80);
        assert_eq!(l.boxes, BoxEncoding::Dfl { bins: 8 });
        assert_eq!(l.center_offset, 0.0);
        assert_eq!(l.resize, ResizeMode::Stretch);
        let l = Layout::detect(
            &[1, 3, 416, 416],
            &outs(&[&[1, 3598, 112]]),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            l.levels.iter().map(|l| l.stride).collect::<Vec<_>>(),
            [8, 16, 32, 64]
        );
        assert_eq!(l.levels[3].width, 7, "ceil(416/64)");
    }

    #[test]
    fn raw_without_batch_dim_ignores_misleading_names() {
        let mut o = outs(&[
            &[1600, 80],
            &[400, 80],
            &[100, 80],
            &[1600, 32],
            &[400, 32],
            &[100, 32],
        ]);
        // The real file names its outputs as if they alternated.
        for (i, n) in [
            "cls_score0",
            "bbox_pred0",
            "cls_score1",
            "bbox_pred1",
            "cls_score2",
            "bbox_pred2",
        ]
        .iter()
        .enumerate()
        {
            o[i].name = n.to_string();
        }
        let l = Layout::detect(&[1, 3, 320, 320], &o, &Default::default()).unwrap();
        assert_eq!(l.kind, LayoutKind::Raw);
        assert_eq!(
            l.outputs,
            OutputMap::PerLevel {
                scores: vec![0, 1, 2],
                boxes: vec![3, 4, 5]
            }
        );
        assert_eq!(l.center_offset, 0.5);
        assert_eq!(l.resize, ResizeMode::Letterbox);
    }

    #[test]
    fn integral_with_batch_dim_in_any_order() {
        let o = outs(&[
            &[1, 100, 4],
            &[1, 1600, 80],
            &[1, 400, 4],
            &[1, 400, 80],
            &[1, 1600, 4],
            &[1, 100, 80],
        ]);
        let l = Layout::detect(&[1, 3, 320, 320], &o, &Default::default()).unwrap();
        assert_eq!(l.kind, LayoutKind::Integral);
        assert_eq!(
            l.outputs,
            OutputMap::PerLevel {
                scores: vec![1, 3, 5],
                boxes: vec![4, 2, 0]
            }
        );
        assert_eq!(
            l.levels.iter().map(|l| l.stride).collect::<Vec<_>>(),
            [8, 16, 32]
        );
    }

    #[test]
    fn fused_single_output() {
        let l = Layout::detect(
            &[1, 3, 320, 320],
            &outs(&[&[1, 2100, 84]]),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(l.kind, LayoutKind::Fused);
        assert_eq!(l.num_classes, 80);
        assert_eq!(
            l.outputs,
            OutputMap::Single {
                output: 0,
                score_column: 4,
                box_column: 0
            }
        );
    }

    #[test]
    fn thirty_two_classes_next_to_dfl_uses_declared_order() {
        let o = outs(&[
            &[64, 32],
            &[16, 32],
            &[4, 32],
            &[64, 32],
            &[16, 32],
            &[4, 32],
        ]);
        let l = Layout::detect(&[1, 3, 64, 64], &o, &Default::default()).unwrap();
        assert_eq!(l.num_classes, 32);
        assert_eq!(
            l.outputs,
            OutputMap::PerLevel {
                scores: vec![0, 1, 2],
                boxes: vec![3, 4, 5]
            }
        );
    }

    #[test]
    fn a_class_name_list_counts_the_classes_unless_a_count_is_set() {
        let names = ["cat", "dog", "bird"];
        let none = LayoutOverrides::default();
        assert_eq!(none.counting(Some(&names[..])).num_classes, Some(3));
        assert_eq!(none.counting::<&str>(None), none);
        let set = LayoutOverrides {
            num_classes: Some(80),
            resize: Some(ResizeMode::Stretch),
            ..LayoutOverrides::default()
        };
        assert_eq!(set.counting(Some(&names[..])), set);
    }

    #[test]
    fn overrides_apply() {
        let o = LayoutOverrides {
            strides: Some(vec![8, 16, 32]),
            center_offset: Some(0.5),
            resize: Some(ResizeMode::Letterbox),
            num_classes: Some(80),
            ..Default::default()
        };
        // A Plus head exported with three levels only.
        let l = Layout::detect(
            &[1, 3, 320, 320],
            &outs(&[&[1, 2100, 112]]),
            &LayoutOverrides {
                layout: Some(LayoutKind::Plus),
                ..o
            },
        )
        .unwrap();
        assert_eq!(l.kind, LayoutKind::Plus);
        assert_eq!(l.levels.len(), 3);
        assert_eq!(l.center_offset, 0.5);
        assert_eq!(l.resize, ResizeMode::Letterbox);
    }

    #[test]
    fn reg_max_follows_from_the_shapes_when_the_class_count_is_known() {
        let three = LayoutOverrides {
            num_classes: Some(3),
            ..Default::default()
        };
        // Plus with reg_max 10: 3 scores + 4 x 11 logits.
        let l = Layout::detect(&[1, 3, 320, 320], &outs(&[&[1, 2125, 47]]), &three).unwrap();
        assert_eq!(
            (l.kind, l.boxes),
            (LayoutKind::Plus, BoxEncoding::Dfl { bins: 11 })
        );
        let o = outs(&[
            &[1600, 3],
            &[400, 3],
            &[100, 3],
            &[1600, 44],
            &[400, 44],
            &[100, 44],
        ]);
        let l = Layout::detect(&[1, 3, 320, 320], &o, &three).unwrap();
        assert_eq!(
            (l.kind, l.boxes),
            (LayoutKind::Raw, BoxEncoding::Dfl { bins: 11 })
        );
        // Without the class count, --reg-max says it.
        let l = Layout::detect(
            &[1, 3, 320, 320],
            &outs(&[&[1, 2125, 47]]),
            &LayoutOverrides {
                reg_max: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((l.num_classes, l.boxes), (3, BoxEncoding::Dfl { bins: 11 }));
    }

    #[test]
    fn unknown_layout_error_lists_shapes_and_layouts() {
        let err = Layout::detect(
            &[1, 3, 320, 320],
            &outs(&[&[1, 1000, 7]]),
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("input [1, 3, 320, 320]"), "{err}");
        assert!(err.contains("out0 [1, 1000, 7]"), "{err}");
        for k in ["plus:", "raw:", "integral:", "fused:"] {
            assert!(err.contains(k), "{err}");
        }
        let err = Layout::detect(
            &[1, 3, 320, 320],
            &outs(&[&[1600, 80], &[400, 80]]),
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("neither is a box output") || err.contains("exactly one"),
            "{err}"
        );
    }

    #[test]
    fn class_count_mismatch_is_reported() {
        let o = LayoutOverrides {
            num_classes: Some(3),
            ..Default::default()
        };
        let err = Layout::detect(&[1, 3, 320, 320], &outs(&[&[1, 2125, 112]]), &o)
            .unwrap_err()
            .to_string();
        assert!(err.contains("matches no single-output layout"), "{err}");
    }
}
