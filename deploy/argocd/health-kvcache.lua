-- Argo CD health check for kvcache.dev/KVCache.
-- Healthy only when the operator has reconciled the current generation and reports Ready=True;
-- Degraded when Degraded=True (or Ready=False with nothing in progress); Suspended while paused;
-- Progressing otherwise.
-- Install: resource.customizations.health.kvcache.dev_KVCache in argocd-cm (see docs/gitops.md).
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }

local function find(conditions, wanted)
  for _, condition in ipairs(conditions) do
    if condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function describe(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

if obj.status == nil then
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local conditions = obj.status.conditions or {}
local ready = find(conditions, "Ready")
local degraded = find(conditions, "Degraded")
local progressing = find(conditions, "Progressing")

-- A condition computed for an older generation says nothing about the current spec.
local function current(condition)
  return condition ~= nil and (generation == nil or condition.observedGeneration == nil
    or condition.observedGeneration >= generation)
end

-- `kubectl kvcache pause` (annotation kvcache.dev/reconcile: paused): the operator leaves the
-- children alone and says so with Progressing=False, reason ReconcilePaused.
if progressing ~= nil and progressing.reason == "ReconcilePaused" then
  hs.status = "Suspended"
  hs.message = describe(progressing, "Reconciliation paused")
  return hs
end

if current(degraded) and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded, "Degraded")
  return hs
end
if current(ready) and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end
if current(progressing) and progressing.status == "True" then
  hs.message = describe(progressing, "Progressing")
  return hs
end
if current(ready) and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready, "Not ready")
  return hs
end
hs.message = "Waiting for the Ready condition of generation " .. tostring(generation)
return hs
