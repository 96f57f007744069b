//! L2 clipping, the first step of every privatised update.

use super::DpError;

/// The Euclidean norm, accumulated in f64.
pub fn l2_norm(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

/// Scales `x` in place so that ‖x‖₂ ≤ `clip_norm`; returns the norm before clipping.
/// A non-finite coordinate is an error: clipping cannot bound it.
pub fn clip_l2(x: &mut [f32], clip_norm: f64) -> Result<f64, DpError> {
    if let Some(index) = x.iter().position(|v| !v.is_finite()) {
        return Err(DpError::NonFinite { index });
    }
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(DpError::Parameter {
            name: "clip_norm",
            reason: format!("must be positive, got {clip_norm}"),
        });
    }
    let norm = l2_norm(x);
    if norm > clip_norm {
        // Rounding the factor down keeps the clipped norm at or below the bound in f32.
        let factor = (clip_norm / norm) * (1.0 - 1e-6);
        for v in x.iter_mut() {
            *v = (f64::from(*v) * factor) as f32;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_vectors_are_scaled_to_the_bound_and_short_ones_untouched() {
        let mut long = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut long, 1.0).expect("finite"), 5.0);
        assert!(l2_norm(&long) <= 1.0 && l2_norm(&long) > 0.999_99);
        assert!((long[0] / long[1] - 0.75).abs() < 1e-6, "direction is kept");

        let mut short = vec![0.3f32, 0.4];
        clip_l2(&mut short, 1.0).expect("finite");
        assert_eq!(short, vec![0.3, 0.4]);
    }

    #[test]
    fn non_finite_updates_are_refused() {
        assert_eq!(clip_l2(&mut [1.0, f32::NAN], 1.0), Err(DpError::NonFinite { index: 1 }));
        assert_eq!(clip_l2(&mut [f32::INFINITY], 1.0), Err(DpError::NonFinite { index: 0 }));
    }
}
