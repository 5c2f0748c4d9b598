-- Argo CD health check for mfed.dev/FederationRound (Lua 5.1, as Argo CD's gopher-lua runs it).
-- Reads only what the operator's status contract promises (docs/operator-contract.md):
-- observedGeneration, phase, and the Ready/Progressing/Degraded conditions.
--   Succeeded -> Healthy (even without some sites: the round met its quorum; the message names them)
--   Failed -> Degraded (the message says why and what to fix)
--   Pending, Training, Aggregating -> Progressing (a storage retry shows in the message)
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

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the mfed operator to pick up the round"
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the mfed operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local ready = condition(status, "Ready")
local degraded = condition(status, "Degraded")
local is_degraded = degraded ~= nil and degraded.status == "True"

if phase == "Succeeded" then
  hs.status = "Healthy"
  if is_degraded then
    hs.message = "Succeeded without some sites: " .. message_of(degraded, "see status.sites")
  else
    hs.message = message_of(ready, "Succeeded")
  end
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(ready, message_of(degraded, "The round failed"))
  return hs
end

if phase == "Pending" or phase == "Training" or phase == "Aggregating" then
  hs.status = "Progressing"
  hs.message = phase .. ": " .. message_of(condition(status, "Progressing"), "in progress")
  if is_degraded then
    hs.message = hs.message .. " (" .. message_of(degraded, "degraded") .. ")"
  end
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
