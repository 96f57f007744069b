//! Adapter downloads, evaluation counts and the coordinator's status.

use super::*;

impl TryFrom<v1::AdapterChunk> for AdapterChunk {
    type Error = WireError;
    fn try_from(m: v1::AdapterChunk) -> Result<Self> {
        if m.data.len() > ADAPTER_CHUNK_BYTES {
            return Err(WireError::TooMany {
                field: Field("AdapterChunk.data"),
                max: ADAPTER_CHUNK_BYTES,
                actual: m.data.len(),
            });
        }
        let end = m.offset.checked_add(m.data.len() as u64);
        if end.is_none_or(|end| end > m.total_bytes) {
            return Err(WireError::invalid("AdapterChunk.offset", "chunk runs past total_bytes"));
        }
        Ok(Self {
            version: m.version,
            offset: m.offset,
            total_bytes: m.total_bytes,
            sha256: fixed(&m.sha256, "AdapterChunk.sha256")?,
            data: m.data,
        })
    }
}

impl From<AdapterChunk> for v1::AdapterChunk {
    fn from(c: AdapterChunk) -> Self {
        Self {
            version: c.version,
            offset: c.offset,
            total_bytes: c.total_bytes,
            sha256: c.sha256.to_vec(),
            data: c.data,
        }
    }
}

impl TryFrom<v1::ReportMetricsRequest> for MetricsReport {
    type Error = WireError;
    fn try_from(m: v1::ReportMetricsRequest) -> Result<Self> {
        if m.hits_at_10 > m.users {
            return Err(WireError::invalid("ReportMetricsRequest.hits_at_10", "more hits than users"));
        }
        let users = m.users as f64;
        for (value, field) in [
            (m.ndcg_at_10_sum, "ReportMetricsRequest.ndcg_at_10_sum"),
            (m.reciprocal_rank_sum, "ReportMetricsRequest.reciprocal_rank_sum"),
        ] {
            if non_negative_finite(value, field)? > users {
                return Err(WireError::invalid(field, "sum exceeds the number of users"));
            }
        }
        Ok(Self {
            merchant_id: merchant_id(&m.merchant_id, "ReportMetricsRequest.merchant_id")?,
            adapter_version: m.adapter_version,
            users: m.users,
            hits_at_10: m.hits_at_10,
            ndcg_at_10_sum: m.ndcg_at_10_sum,
            reciprocal_rank_sum: m.reciprocal_rank_sum,
        })
    }
}

impl From<MetricsReport> for v1::ReportMetricsRequest {
    fn from(r: MetricsReport) -> Self {
        Self {
            merchant_id: r.merchant_id.0,
            adapter_version: r.adapter_version,
            users: r.users,
            hits_at_10: r.hits_at_10,
            ndcg_at_10_sum: r.ndcg_at_10_sum,
            reciprocal_rank_sum: r.reciprocal_rank_sum,
        }
    }
}

impl TryFrom<v1::StatusResponse> for StatusReport {
    type Error = WireError;
    fn try_from(m: v1::StatusResponse) -> Result<Self> {
        Ok(Self {
            federation_id: fixed(&m.federation_id, "StatusResponse.federation_id")?,
            registered_merchants: m.registered_merchants,
            rounds_completed: m.rounds_completed,
            rounds_aborted: m.rounds_aborted,
            latest_adapter_version: m.latest_adapter_version,
            epsilon_spent: non_negative_finite(m.epsilon_spent, "StatusResponse.epsilon_spent")?,
            delta: non_negative_finite(m.delta, "StatusResponse.delta")?,
            current_phase: m.current_phase,
            shopper_epsilon_spent: non_negative_finite(
                m.shopper_epsilon_spent,
                "StatusResponse.shopper_epsilon_spent",
            )?,
            manifest: m.manifest.map(AdapterManifest::try_from).transpose()?,
            training_from_version: m.training_from_version,
        })
    }
}

impl From<StatusReport> for v1::StatusResponse {
    fn from(s: StatusReport) -> Self {
        Self {
            federation_id: s.federation_id.to_vec(),
            registered_merchants: s.registered_merchants,
            rounds_completed: s.rounds_completed,
            rounds_aborted: s.rounds_aborted,
            latest_adapter_version: s.latest_adapter_version,
            epsilon_spent: s.epsilon_spent,
            delta: s.delta,
            current_phase: s.current_phase,
            shopper_epsilon_spent: s.shopper_epsilon_spent,
            manifest: s.manifest.map(Into::into),
            training_from_version: s.training_from_version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_chunks_may_not_run_past_their_file() {
        let chunk = v1::AdapterChunk {
            version: 1,
            offset: 10,
            total_bytes: 12,
            sha256: vec![0; 32],
            data: vec![0; 3],
        };
        let error = AdapterChunk::try_from(chunk).expect_err("overrun");
        assert!(error.to_string().contains("past total_bytes"), "{error}");
    }

    #[test]
    fn a_status_states_the_federations_manifest_and_older_ones_none() {
        let manifest =
            AdapterManifest::sequence_tower([2; 32], TowerShape::tiny(4), 9).with_catalogue(Some([5; 32]));
        let status = StatusReport {
            federation_id: [1; 16],
            registered_merchants: 3,
            rounds_completed: 2,
            rounds_aborted: 0,
            latest_adapter_version: 2,
            epsilon_spent: 0.5,
            delta: 1e-6,
            current_phase: "idle".into(),
            shopper_epsilon_spent: 0.0,
            manifest: Some(manifest),
            training_from_version: 21,
        };
        let wire = v1::StatusResponse::from(status.clone());
        assert_eq!(StatusReport::try_from(wire.clone()).expect("valid"), status);
        let older = v1::StatusResponse { manifest: None, ..wire.clone() };
        assert_eq!(StatusReport::try_from(older).expect("valid").manifest, None);
        // A malformed manifest is refused, named, like any other field.
        let mut bad = wire;
        if let Some(m) = bad.manifest.as_mut() {
            m.base_model_sha256 = vec![0; 3];
        }
        let error = StatusReport::try_from(bad).expect_err("malformed").to_string();
        assert!(error.contains("base_model_sha256"), "{error}");
    }
}
