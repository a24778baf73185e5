//! Where a request goes when a circuit breaker is configured (see [`crate::resilience`]): the
//! steps of [`Exchange`] that route it to its model or a fallback, rewrite it, and tell the
//! served model's circuit how it ended.

use super::{replace_body, BodyCopy, Exchange, Flow, Host, InternalError, Metric, Worker};
use crate::meter::classify::ErrorType;
use crate::meter::labels::{sanitize, OTHER, UNKNOWN};
use crate::resilience::breaker::{self, Admit, Outcome};
use crate::resilience::{self, Route};

impl Exchange {
    /// Decides where the request goes, once, when the model is known as well as it will be
    /// before the request is forwarded (see [`crate::resilience`]): its own model when its
    /// circuit admits it, else the first model of its chain whose circuit does (the body's
    /// `model`, or a Gemini path, rewritten; `whole_body`: the body is held whole, so it can
    /// be), else a local 503. `Some(Flow::Respond)` when answered.
    pub(super) fn route<H: Host>(&mut self, host: &mut H, worker: &mut Worker, whole_body: bool) -> Option<Flow> {
        if self.routed || !worker.config.resilience.is_active() {
            return None;
        }
        self.routed = true;
        let model = self.request_model()?.to_string();
        // A model has a circuit when it has a label of its own (bounded like the labels) or
        // the configuration names it.
        let label = worker.model_label(host, Some(&model));
        let own = label != OTHER && label != UNKNOWN;
        // The request's start, read once already: a few ms early is as good for a circuit.
        let now_ms = self.started_nanos / 1_000_000;
        let config = &worker.config;
        let tracked = |m: &str| (m == model && own) || config.resilience.names(m);
        let route = resilience::route(&*host, &config.resilience, &config.metrics.prefix, &model, tracked, now_ms);
        match route {
            Route::Requested(admit) => {
                self.admitted(host, worker, &model, admit);
                None
            }
            Route::Fallback { to, admit } => {
                if !self.rewrite_model(host, worker, &to, whole_body) {
                    // Forwarded already, or not a JSON object: it goes where it asked.
                    return None;
                }
                let to_label = worker.model_label(host, Some(&to));
                host.counter_add(&worker.name(Metric::FallbacksTotal, &[&label, &to_label]), 1);
                self.fallback_from = Some(sanitize(&model));
                self.served = Some(to.clone());
                self.admitted(host, worker, &to, admit);
                None
            }
            Route::Unavailable { tried, retry_after_ms } => {
                let rejection = resilience::unavailable(&tried, retry_after_ms);
                self.local_error = Some(ErrorType::CircuitOpen);
                Some(self.respond(host, worker, rejection))
            }
        }
    }

    /// The circuit of `model` admitted this request: it reports there at the end; a probe that
    /// starts a half-open period is that period's transition.
    fn admitted<H: Host>(&mut self, host: &mut H, worker: &mut Worker, model: &str, admit: Admit) {
        if admit == (Admit::Probe { first: true }) {
            worker.circuit_entered(host, model, breaker::State::HalfOpen);
        }
        self.circuit = Some((model.to_string(), admit));
    }

    /// Puts `to` into the held request (body `model`, or the path of a Gemini request).
    fn rewrite_model<H: Host>(&mut self, host: &mut H, worker: &mut Worker, to: &str, whole_body: bool) -> bool {
        if self.request.model().is_none() {
            // Gemini names the model in the path, which can change while the headers are held.
            let Some(path) = host.request_header(":path") else { return false };
            let Some(new) = resilience::rewrite_path_model(&path, to) else { return false };
            host.set_request_header(":path", &new);
            return true;
        }
        if !whole_body || self.held_bytes.is_none() {
            return false;
        }
        let BodyCopy::Read(Ok(body)) = self.with_held_body(host, worker, |body| resilience::rewrite_model(body, to))
        else {
            return false;
        };
        replace_body(host, &body);
        true
    }

    /// Tells the served model's circuit how the request ended: a success, a failure of a
    /// class the breaker counts (a 429 that says when to come back opens it until then), or
    /// neither.
    pub(super) fn report_circuit<H: Host>(
        &mut self,
        host: &mut H,
        worker: &mut Worker,
        error: ErrorType,
        end_nanos: u64,
    ) {
        let Some((model, admit)) = self.circuit.take() else { return };
        let (Some(params), Some(breaker)) =
            (resilience::params(&worker.config.resilience), worker.config.resilience.breaker.as_ref())
        else {
            return;
        };
        let outcome = match (error, self.come_back_ms) {
            (ErrorType::None, _) => Outcome::Success,
            (ErrorType::UpstreamRateLimit, Some(ms)) if breaker.counts(error) => Outcome::ComeBackAfter { ms },
            (e, _) if breaker.counts(e) => Outcome::Failure,
            _ => Outcome::Neutral,
        };
        let key = resilience::circuit_key(&worker.config.metrics.prefix, &model);
        let now_ms = end_nanos / 1_000_000;
        match breaker::report(&*host, &key, params, now_ms, admit, outcome) {
            Ok(Some(state)) => worker.circuit_entered(host, &model, state),
            Ok(None) => {}
            Err(breaker::StoreFailed) => worker.count_error(host, InternalError::SharedData),
        }
    }
}
