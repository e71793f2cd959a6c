-- Read warm leases, one after the other: wrk -s get.lua URL -- ID[,ID...]
package.path = package.path .. ";" .. debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "?.lua"
local common = require("common")
local reqs, n = {}, 0

function init(args)
   for id in string.gmatch(args[1], "[^,]+") do
      table.insert(reqs, wrk.format("GET", "/v1/leases/" .. id, common.headers()))
   end
end

function request()
   n = n % #reqs + 1
   return reqs[n]
end

done = common.done
