-- writer.lua: the POST load of bench-progress. It is ../ingest/fhir_post.lua (a new valid PHQ-9
-- QuestionnaireResponse per request, patients P0001..P1000, bearer key FHIR_KEY), loaded from
-- the path in FHIR_POST_SCRIPT, plus an optional pace: FHIR_DELAY_MS=N makes each connection wait
-- N ms before each request (wrk's delay() hook), so that a fixed number of connections posts at
-- about conns * 1000 / N requests/s at most. Without FHIR_DELAY_MS it posts as fast as it can.
dofile(assert(os.getenv("FHIR_POST_SCRIPT"), "FHIR_POST_SCRIPT: path of fhir_post.lua"))

local delay_ms = tonumber(os.getenv("FHIR_DELAY_MS") or "0") or 0
if delay_ms > 0 then
  function delay() return delay_ms end
end
