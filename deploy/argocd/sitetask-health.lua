-- Argo CD health check for mfed.dev/SiteTask (Lua 5.1, as Argo CD's gopher-lua runs it).
-- A SiteTask has no phase: the operator reports whether its spec is valid (Ready/Degraded
-- conditions) and how the site did in its last round (status.lastRound), which is information,
-- not health: a site whose upload was rejected is still a correctly configured site.
--   Ready=True -> Healthy;  Ready=False or Degraded=True -> Degraded (the message says what to fix)
--   no status yet, or a spec change the operator has not seen -> Progressing
local hs = {}

local function condition(status, kind)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local status = obj.status
local ready = status ~= nil and condition(status, "Ready") or nil
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the mfed operator to validate the SiteTask"
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the mfed operator to observe generation " .. tostring(generation)
  return hs
end

local degraded = condition(status, "Degraded")
if ready.status == "True" and not (degraded ~= nil and degraded.status == "True") then
  hs.status = "Healthy"
  local last = status.lastRound
  if type(last) == "table" and last.name ~= nil then
    hs.message = "Last round " .. tostring(last.name) .. ": " .. tostring(last.result or "unknown")
    if last.reason ~= nil and last.reason ~= "" then
      hs.message = hs.message .. " (" .. tostring(last.reason) .. ")"
    end
  else
    hs.message = ready.message or "Valid; not in a round yet"
  end
  return hs
end

if ready.status == "Unknown" and not (degraded ~= nil and degraded.status == "True") then
  hs.status = "Progressing"
  hs.message = ready.message or "Being validated"
  return hs
end

hs.status = "Degraded"
local source = (degraded ~= nil and degraded.status == "True") and degraded or ready
hs.message = source.message or source.reason or "The SiteTask is not valid"
return hs
