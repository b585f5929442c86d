-- fhir_post.lua: wrk script that POSTs valid FHIR R4 PHQ-9 QuestionnaireResponses (~1.6 KB each,
-- shaped like a patient app's: meta.profile, identifier, subject, answer displays, the optional
-- difficulty item 69722-7; no text narrative), each with a new identifier, so every valid
-- request is a new row (201). Same body shape as ../../../shared/peers/go-seed/fhir_post.lua, so
-- both servers get the same load. Patients P0001..P1000 (the demo trial's).
-- Env: FHIR_KEY (bearer key), FHIR_COUNT_STATUS=1 prints the status counts at the end.

local links = { "44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8" }
local answers = {
  { "LA6568-5", "Not at all" }, { "LA6569-3", "Several days" },
  { "LA6570-1", "More than half the days" }, { "LA6571-9", "Nearly every day" },
}
local difficulty = {
  { "LA6572-7", "Not difficult at all" }, { "LA6573-5", "Somewhat difficult" },
  { "LA6574-3", "Very difficult" }, { "LA6575-0", "Extremely difficult" },
}

local function item_json(link, a)
  return '{"linkId":"' .. link .. '","answer":[{"valueCoding":{"system":"http://loinc.org","code":"'
      .. a[1] .. '","display":"' .. a[2] .. '"}}]}'
end

local item_str = {}
for i, link in ipairs(links) do
  item_str[i] = {}
  for v = 1, 4 do item_str[i][v] = item_json(link, answers[v]) end
end
local diff_str = {}
for v = 1, 4 do diff_str[v] = item_json("69722-7", difficulty[v]) end

local prefix, counter, headers, authored = nil, 0, nil, {}
status_counts = {}

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function init(args)
  local f = assert(io.open("/dev/urandom", "rb"))
  local r = f:read(8)
  f:close()
  prefix = hex(r:sub(1, 6))
  local seed = 0
  for k = 1, 8 do seed = (seed * 256 + r:byte(k)) % 2147483647 end
  math.randomseed(seed)
  headers = {
    ["Content-Type"] = "application/fhir+json",
    ["Accept"] = "application/fhir+json",
    ["Authorization"] = "Bearer " .. (os.getenv("FHIR_KEY") or "none"),
  }
  local now = os.time()
  for k = 1, 64 do
    authored[k] = os.date("!%Y-%m-%dT%H:%M:%S+00:00", now - math.random(120, 86400))
  end
end

function request()
  counter = counter + 1
  local pid = string.format("P%04d", math.random(1, 1000))
  local parts = {
    '{"resourceType":"QuestionnaireResponse",',
    '"meta":{"profile":["http://hl7.org/fhir/StructureDefinition/QuestionnaireResponse"]},',
    '"identifier":{"system":"https://epro.example.org/fhir/sid/submission","value":"', prefix, '-', counter, '"},',
    '"questionnaire":"http://loinc.org/q/44249-1",',
    '"status":"completed",',
    '"subject":{"reference":"Patient/', pid, '"},',
    '"authored":"', authored[math.random(1, 64)], '",',
    '"item":[',
  }
  for i = 1, 9 do
    parts[#parts + 1] = item_str[i][math.random(1, 4)]
    parts[#parts + 1] = ","
  end
  parts[#parts + 1] = diff_str[math.random(1, 4)]
  parts[#parts + 1] = "]}"
  return wrk.format("POST", "/fhir/QuestionnaireResponse", headers, table.concat(parts))
end

if os.getenv("FHIR_COUNT_STATUS") then
  local threads = {}
  function setup(thread) threads[#threads + 1] = thread end
  function response(status, hdrs, body)
    status_counts[status] = (status_counts[status] or 0) + 1
  end
  function done(summary, latency, requests)
    local total = {}
    for _, t in ipairs(threads) do
      for s, n in pairs(t:get("status_counts")) do total[s] = (total[s] or 0) + n end
    end
    local line = "status_counts"
    for s, n in pairs(total) do line = line .. " " .. s .. "=" .. n end
    io.write(line .. "\n")
  end
end
