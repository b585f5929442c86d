-- get_auth.lua: GET with a bearer key (FHIR_KEY), for reading a stored resource.
local headers
function init(args)
  headers = { ["Accept"] = "application/fhir+json",
              ["Authorization"] = "Bearer " .. (os.getenv("FHIR_KEY") or "none") }
end
function request()
  return wrk.format("GET", nil, headers)
end
