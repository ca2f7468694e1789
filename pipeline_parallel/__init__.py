"""Pipeline parallelism: process groups, activation transport, ring schedule, executors."""
